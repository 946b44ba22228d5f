r"""Compare zero-shot, fully fine-tuned and LoRA FLAN-T5 on DialogSum with batched beam search + ROUGE.

    python evaluate.py --base google/flan-t5-small --instruct runs/notebook-full/best \
        --adapter runs/notebook-lora/best --data knkarthick/dialogsum --split test \
        --output-dir runs/eval --show 200

--adapter and --instruct may be repeated as NAME=DIR (--adapter r8=runs/a/best --adapter r16=runs/b/best):
the base is loaded and the zero-shot summaries generated once, and each adapter is applied in turn.
Writes results.csv (one row per dialogue and reference; the notebook's columns, plus NAME_model_summaries
per named model), scores.csv (per dialogue and model), metrics.json, report.md with paired-bootstrap
intervals (--bootstrap N resamples) of every model against the original and against --reference, and
rouge.png (with the [plot] extra).
"""

import sys

from dialsum_raw.config import EVALUATE, build_parser, settings_from
from dialsum_raw.errors import run_cli

def main(argv=None):
    parser = build_parser(EVALUATE, __doc__.split("\n\n")[0], required=("output_dir",))
    parser.epilog = "example: " + __doc__.split("\n\n")[1].strip()
    args = parser.parse_args(argv)
    settings = settings_from(args)
    from dialsum_raw.compare import run
    result = run(settings)
    width = max(9, *map(len, result["scores"]))
    for name, s in result["scores"].items():
        print(f"{name:{width}s} " + "  ".join(f"{k} {100 * v:.2f}" for k, v in s["per_row"].items()))
    n = len(result["dialogues"])
    for name, seconds in result["seconds"].items():
        print(
            f"{name:{width}s} generation {seconds / 60:.1f} min for {n} dialogues ({n / seconds:.2f} "
            "dialogues/s)"
        )
    with open(f"{settings.output_dir}/report.md") as f:
        text = f.read()
    if settings.show:
        print(text[text.index("## Dialogue"):])
    chart = "" if result["chart_note"] else ", rouge.png"
    print(f"wrote {settings.output_dir}/results.csv, scores.csv, metrics.json, report.md{chart}")


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])

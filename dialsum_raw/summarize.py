"""Summarize your own dialogue with a model (and optional LoRA adapter).

    python -m dialsum_raw.summarize --model runs/full/best chat.txt
    echo "Ann: Lunch at noon?\\nBob: Sure, see you there." | python -m dialsum_raw.summarize --model
    google/flan-t5-small

Lines may be '#Person1#: ...' (DialogSum's form) or 'Name: ...'. Names are turned into
#PersonN# tags, which fine-tuned models know, and put back into the summary.
"""

import re
import sys

from .config import SUMMARIZE, build_parser, settings_from
from .errors import UserError, run_cli

_SPEAKER = re.compile(r"^\s*([^:#\n]{1,40}?)\s*:\s*(.*)$")


def to_dialogsum(text):
    """(dialogue with #PersonN# speakers, {tag: name}); lines without 'Name:' are kept as they are."""
    names, lines = {}, []
    for line in text.strip().splitlines():
        if not line.strip():
            continue
        m = _SPEAKER.match(line)
        if m and not line.lstrip().startswith("#Person"):
            tag = names.setdefault(m.group(1), f"#Person{len(names) + 1}#")
            line = f"{tag}: {m.group(2)}"
        lines.append(line)
    if not lines:
        raise UserError("the dialogue is empty: give a file or pipe text with lines like 'Ann: Hello'")
    return "\n".join(lines), {tag: name for name, tag in names.items()}


def main(argv=None):
    parser = build_parser(SUMMARIZE, __doc__.split("\n\n")[0])
    parser.prog = "python -m dialsum_raw.summarize"
    parser.add_argument("file", nargs="?", help="dialogue text file (default: stdin)")
    args = parser.parse_args(argv)
    path = args.__dict__.pop("file")
    settings = settings_from(args)
    settings.eval_batch_size = 1
    if len(settings.adapter) > 1:
        raise UserError(f"summarize takes one --adapter, got {len(settings.adapter)}")
    try:
        text = open(path, encoding="utf-8").read() if path else sys.stdin.read()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}")
    dialogue, tags = to_dialogsum(text)

    from . import lora
    from .generation import summarize
    from .modeling import compute_device, inference_storage, load_model, load_tokenizer
    device = compute_device()
    model = load_model(settings.model, **inference_storage(settings, device, settings.adapter))
    if settings.adapter:
        lora.load_adapter(model, settings.adapter[0])
        lora.merge_for_inference(model)
    model.to(device)
    (summary,) = summarize(model, load_tokenizer(settings.model), [dialogue], settings, desc="summarize")
    for tag, name in tags.items():
        summary = summary.replace(tag, name)
    print(summary)


if __name__ == "__main__":
    run_cli(main)

"""results.csv, scores.csv, metrics.json, report.md and rouge.png for a comparison run; every text
file written atomically. Scores and intervals come from metrics.py: this module only formats them.
Models appear in the order of the `scores` dict the caller gives (compare: original, instruct models,
adapters)."""

import csv
import io
import json
import os

from . import plot
from .checkpoint import atomic_write
from .data import flatten
from .errors import UserError
from .metrics import ROUGE_TYPES

NOTEBOOK = (
    "original",
    "instruct",
    "peft",
)  # the notebook's columns: zero-shot base, full fine-tune, base + LoRA
SCORE_COLUMNS = ["id", "model"] + [f"{k}_{how}" for k in ROUGE_TYPES for how in ("best", "mean")]


def pairs(names, reference):
    """The report's comparisons: every model against the original, then the reference against every other
    model (the notebook's three columns give peft vs original, instruct vs original, peft vs instruct)."""
    return [(n, "original") for n in names if n != "original"] + \
        [(reference, n) for n in names if n not in ("original", reference)]


def results_csv(dialogues, summaries) -> str:
    """One row per (dialogue, reference), as the notebook's zipped summaries: its three model columns always
    (an absent model's stays empty), then NAME_model_summaries for each other model."""
    names = [*NOTEBOOK, *(n for n in summaries if n not in NOTEBOOK)]
    by_id = {name: dict(zip((d.id for d in dialogues), preds)) for name, preds in summaries.items()}
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["id", "dialogue", "human_baseline_summaries", *(f"{n}_model_summaries" for n in names)])
    for rid, d, ref in flatten(dialogues):
        w.writerow([rid, d.dialogue, ref] + [by_id.get(m, {}).get(d.id, "") for m in names])
    return buf.getvalue()


def scores_csv(dialogues, scores) -> str:
    """One row per (model, dialogue): each rouge type's best and mean over the dialogue's references."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(SCORE_COLUMNS)
    for name in scores:
        units = scores[name]["per_dialogue"]
        for i, d in enumerate(dialogues):
            w.writerow([d.id, name] + [units[how][k][i] for k in ROUGE_TYPES for how in ("best", "mean")])
    return buf.getvalue()


def _pct(x):
    return f"{100 * x:.2f}"


def _signed(x):
    return f"{100 * x:+.2f}"


def _verdict(pair, cis):
    """Says in words, per rouge type, whether the interval lies above 0, below 0 or contains it."""
    groups = {"significant gain (interval above 0)": [k for k in ROUGE_TYPES if cis[k][0] > 0],
              "significant loss (interval below 0)": [k for k in ROUGE_TYPES if cis[k][1] < 0],
              "no significant difference (interval contains 0)":
                  [k for k in ROUGE_TYPES if cis[k][0] <= 0 <= cis[k][1]]}
    return f"- {pair}: " + "; ".join(f"{what} in {', '.join(ks)}" for what, ks in groups.items() if ks) + "."


def markdown(scores, intervals, dialogues, summaries, show, meta, chart_note=None) -> str:
    names = list(scores)
    lines = [
        f"# DialogSum ROUGE: {meta['split']} split, {meta['dialogues']} dialogues, {meta['rows']} reference "
        "rows",
        "",
        "Models: " + ", ".join(f"{n} = `{meta['models'][n]}`" for n in names),
        f"Generation: {meta['generation']}",
        "",
        "ROUGE F1 in percent. rougeLsum splits sentences onto lines; `evaluate.load('rouge')`, which the "
        "notebook used, does not, so the notebook's rougeLsum equals its rougeL on these one-line summaries.",
        "",
        chart_note or "![ROUGE per model with 95% bootstrap intervals](rouge.png)",
        "",
    ]
    if meta.get("int8_agreement"):
        lines += [
            "**int8 preview** (`--quantize int8`): not for reporting. Its agreement with the same model "
            "unquantized, on the first dialogues:",
            "",
        ]
        lines += [
            f"- {n}: {a['identical']}/{a['dialogues']} summaries identical; ROUGE difference "
            + ", ".join(f"{k} {_signed(v)}" for k, v in a["rouge_difference"].items() if k in ROUGE_TYPES)
            for n, a in meta["int8_agreement"].items()
        ]
        lines.append("")
    header = "| model | " + " | ".join(ROUGE_TYPES) + " |"
    rule = "|---" * (len(ROUGE_TYPES) + 1) + "|"
    compared = [tuple(key.split(" vs ")) for key in intervals["differences"]]
    for kind, title in (("per_row", "Mean over reference rows (the notebook's figure on the hub layout)"),
                        ("multi_ref_max", "Multi-reference: best reference per dialogue"),
                        ("multi_ref_mean", "Multi-reference: mean over references per dialogue")):
        lines += [f"## {title}", "", header, rule]
        lines += [
            f"| {n} | " + " | ".join(_pct(scores[n][kind][k]) for k in ROUGE_TYPES) + " |" for n in names
        ]
        if compared:
            lines += [
                "",
                "Absolute improvement in percentage points; in brackets, its "
                f"{100 * intervals['level']:.0f}% "
                f"paired-bootstrap interval ({intervals['resamples']:,} resamples of the dialogues, "
                f"seed {intervals['seed']}):",
                "",
                header.replace("model", "comparison", 1),
                rule,
            ]
            for a, b in compared:
                cis = intervals["differences"][f"{a} vs {b}"][kind]
                lines.append(
                    f"| {a} vs {b} | "
                    + " | ".join(
                        f"{_signed(scores[a][kind][k] - scores[b][kind][k])} [{_signed(cis[k][0])}, "
                        f"{_signed(cis[k][1])}]"
                        for k in ROUGE_TYPES
                    )
                    + " |"
                )
            lines += [""] + [
                _verdict(f"{a} vs {b}", intervals["differences"][f"{a} vs {b}"][kind]) for a, b in compared
            ]
        lines.append("")
    for index in show:
        d = dialogues[index]
        lines += [f"## Dialogue {index} ({d.id})", "", "```", d.dialogue, "```", ""]
        lines += [f"- **human**: {' / '.join(d.refs)}"] + [f"- **{n}**: {summaries[n][index]}" for n in names]
        lines.append("")
    return "\n".join(lines)


def write(out, dialogues, summaries, scores, intervals, show, meta):
    """Writes every file; returns a one-line note when the chart was skipped (matplotlib missing), else
    None."""
    os.makedirs(out, exist_ok=True)
    summary = {
        "meta": meta,
        **{n: {k: v for k, v in s.items() if k != "per_dialogue"} for n, s in scores.items()},
        "intervals": intervals,
    }
    try:
        plot.rouge_chart(summary, os.path.join(out, "rouge.png"))
        chart_note = None
    except UserError as e:
        chart_note = f"rouge.png skipped ({e}); then: python -m dialsum_raw.plot {out} --out {out}/rouge.png"
    atomic_write(os.path.join(out, "results.csv"), results_csv(dialogues, summaries))
    atomic_write(os.path.join(out, "scores.csv"), scores_csv(dialogues, scores))
    atomic_write(os.path.join(out, "report.md"), markdown(scores, intervals, dialogues, summaries, show, meta,
                                                          chart_note))
    atomic_write(os.path.join(out, "metrics.json"), json.dumps(summary, indent=2) + "\n")
    return chart_note

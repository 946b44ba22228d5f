"""results.csv, metrics.json and report.md for a comparison run; every file written atomically."""

import csv
import io
import json
import os

from .data import flatten
from .metrics import ROUGE_TYPES

MODELS = ("original", "instruct", "peft")  # zero-shot base, full fine-tune, base + LoRA
COLUMNS = ["id", "dialogue", "human_baseline_summaries", "original_model_summaries",
           "instruct_model_summaries", "peft_model_summaries"]
IMPROVEMENTS = (("peft", "original"), ("peft", "instruct"), ("instruct", "original"))


def atomic_write(path, text):
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def results_csv(dialogues, summaries) -> str:
    """One row per (dialogue, reference), as the notebook's zipped summaries; absent models stay empty."""
    by_id = {name: dict(zip((d.id for d in dialogues), preds)) for name, preds in summaries.items()}
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(COLUMNS)
    for rid, d, ref in flatten(dialogues):
        w.writerow([rid, d.dialogue, ref] + [by_id.get(m, {}).get(d.id, "") for m in MODELS])
    return buf.getvalue()


def _pct(x):
    return f"{100 * x:.2f}"


def markdown(scores, dialogues, summaries, show, meta) -> str:
    names = [m for m in MODELS if m in scores]
    lines = [f"# DialogSum ROUGE: {meta['split']} split, {meta['dialogues']} dialogues, {meta['rows']} reference rows",
             "", "Models: " + ", ".join(f"{n} = `{meta['models'][n]}`" for n in names),
             f"Generation: {meta['generation']}", ""]
    header = "| model | " + " | ".join(ROUGE_TYPES) + " |"
    for kind, title in (("per_row", "Mean over reference rows (as evaluate.load('rouge') on the hub layout)"),
                        ("multi_ref_max", "Multi-reference: best reference per dialogue"),
                        ("multi_ref_mean", "Multi-reference: mean over references per dialogue")):
        lines += [f"## {title}", "", header, "|---" * (len(ROUGE_TYPES) + 1) + "|"]
        lines += [f"| {n} | " + " | ".join(_pct(scores[n][kind][k]) for k in ROUGE_TYPES) + " |" for n in names]
        pairs = [(a, b) for a, b in IMPROVEMENTS if a in scores and b in scores]
        if pairs:
            lines += ["", "Absolute improvement (percentage points):", "", header.replace("model", "comparison", 1),
                      "|---" * (len(ROUGE_TYPES) + 1) + "|"]
            lines += [f"| {a} vs {b} | " + " | ".join(f"{100 * (scores[a][kind][k] - scores[b][kind][k]):+.2f}"
                                                      for k in ROUGE_TYPES) + " |" for a, b in pairs]
        lines.append("")
    for index in show:
        d = dialogues[index]
        lines += [f"## Dialogue {index} ({d.id})", "", "```", d.dialogue, "```", ""]
        lines += [f"- **human**: {' / '.join(d.refs)}"] + [f"- **{n}**: {summaries[n][index]}" for n in names]
        lines.append("")
    return "\n".join(lines)


def write(out, dialogues, summaries, scores, show, meta):
    os.makedirs(out, exist_ok=True)
    atomic_write(os.path.join(out, "results.csv"), results_csv(dialogues, summaries))
    atomic_write(os.path.join(out, "report.md"), markdown(scores, dialogues, summaries, show, meta))
    atomic_write(os.path.join(out, "metrics.json"), json.dumps({"meta": meta, **scores}, indent=2) + "\n")

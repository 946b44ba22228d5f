"""metrics.jsonl, a training run's log: one JSON object per line, each with its optimizer step. One reader
for every tool that reads it (runs, plot, a resume's trim), so a damaged line reads the same everywhere."""

import json

METRICS_FILE = "metrics.jsonl"


def read_metrics(path, notes) -> list:
    """The file's lines as dicts, in order. Blank lines are skipped; a line that is not a JSON object with an
    integer "step" (cut short by a crash, edited by hand) is skipped with a note 'FILE line N: ...' appended
    to `notes`, and the other lines are kept."""
    lines = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                line = json.loads(text)
            except ValueError:
                line = None
            if (
                not isinstance(line, dict)
                or isinstance(line.get("step"), bool)
                or not isinstance(line.get("step"), int)
            ):
                notes.append(
                    f"{path} line {number}: damaged (not a JSON object with a step: {text.strip()[:40]!r}); "
                    "skipped"
                )
                continue
            lines.append(line)
    return lines

"""Issue 29: silent wrong results, unresumable runs and tracebacks an adversarial review found, each held
here by a test that failed before its fix."""

import json
import types

from dialsum_raw import training


def test_resume_trims_a_log_with_blank_and_damaged_lines(tmp_path):
    """A blank line (a hand edit, a copy) and a line a crash cut short: the resume's trim drops them with a
    note naming the line, and keeps every good line up to the checkpoint's step."""
    lines = [{"step": 2, "loss": 1.0}, {"step": 4, "loss": 0.5}, {"step": 6, "loss": 0.25}]
    log = tmp_path / "metrics.jsonl"
    log.write_text(json.dumps(lines[0]) + "\n\n" + json.dumps(lines[1]) + "\n" + json.dumps(lines[2]) + '\n{"st')
    said = []
    run = types.SimpleNamespace(out=str(tmp_path), progress={"step": 4}, log=said.append)
    training.trim_metrics(run)
    assert log.read_text() == "".join(json.dumps(m) + "\n" for m in lines[:2])
    assert said == [f"{log} line 5: damaged (not a JSON object with a step: '{{\"st'); skipped"]

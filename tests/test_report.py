import csv
import json
import sys

import pytest

from dialsum_raw import metrics, report
from dialsum_raw.data import Dialogue


@pytest.fixture(scope="module")
def evaluation():
    """40 three-reference dialogues: peft and instruct repeat a reference, original says nothing useful."""
    dialogues = [
        Dialogue(
            f"test_{i}",
            f"#Person1#: hello {i}",
            [f"ref {i} one {i % 3}. more.", f"other {i} text", f"third {i} words here"],
        )
        for i in range(40)
    ]
    summaries = {"original": ["nothing at all"] * 40, "instruct": [d.refs[0] for d in dialogues],
                 "peft": [d.refs[0] for d in dialogues]}
    scores = {n: metrics.rouge(p, [d.refs for d in dialogues]) for n, p in summaries.items()}
    return (
        dialogues,
        summaries,
        scores,
        metrics.intervals(scores, report.pairs(list(scores), "peft"), resamples=300),
    )


META = {"split": "test", "dialogues": 40, "rows": 120, "generation": {"num_beams": 1},
        "models": {"original": "base", "peft": "base + adapter", "instruct": "full"}}


def test_report_gives_intervals_and_says_which_exclude_zero(evaluation, tmp_path):
    dialogues, summaries, scores, intervals = evaluation
    assert report.write(str(tmp_path), dialogues, summaries, scores, intervals, [1], META) is None
    text = (tmp_path / "report.md").read_text()
    assert "![ROUGE per model with 95% bootstrap intervals](rouge.png)" in text
    assert (tmp_path / "rouge.png").read_bytes()[:4] == b"\x89PNG"
    assert "in brackets, its 95% paired-bootstrap interval (300 resamples of the dialogues, seed 0)" in text
    low, high = intervals["differences"]["peft vs original"]["per_row"]["rouge1"]
    diff = scores["peft"]["per_row"]["rouge1"] - scores["original"]["per_row"]["rouge1"]
    assert f"| peft vs original | {100 * diff:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}] |" in text
    assert text.count("- peft vs original: significant gain (interval above 0) in rouge1, rouge2, rougeL, "
                      "rougeLsum.") == 3
    assert (
        text.count(
            "- peft vs instruct: no significant difference (interval contains 0) in rouge1, rouge2, "
            "rougeL, rougeLsum."
        )
        == 3
    )
    stored = json.loads((tmp_path / "metrics.json").read_text())
    assert list(stored) == ["meta", "original", "instruct", "peft", "intervals"]
    assert "per_dialogue" not in stored["peft"] and stored["intervals"] == intervals


def test_verdict_names_gains_losses_and_ties():
    cis = {
        "rouge1": [0.01, 0.02],
        "rouge2": [-0.03, -0.01],
        "rougeL": [-0.01, 0.01],
        "rougeLsum": [0.0, 0.01],
    }
    assert report._verdict("a vs b", cis) == (
        "- a vs b: significant gain (interval above 0) in rouge1; significant loss (interval below 0) in "
        "rouge2; "
        "no significant difference (interval contains 0) in rougeL, rougeLsum."
    )


def test_scores_csv_lists_each_dialogue_per_model(evaluation, tmp_path):
    dialogues, summaries, scores, intervals = evaluation
    rows = list(csv.DictReader(report.scores_csv(dialogues, scores).splitlines()))
    assert list(rows[0]) == ["id", "model", "rouge1_best", "rouge1_mean", "rouge2_best", "rouge2_mean",
                             "rougeL_best", "rougeL_mean", "rougeLsum_best", "rougeLsum_mean"]
    assert len(rows) == 120 and [r["model"] for r in rows[::40]] == ["original", "instruct", "peft"]
    peft = rows[80:]
    assert [r["id"] for r in peft] == [d.id for d in dialogues]
    assert all(float(r["rouge1_best"]) == 1.0 for r in peft)
    for k in metrics.ROUGE_TYPES:
        assert [float(r[f"{k}_mean"]) for r in peft] == scores["peft"]["per_dialogue"]["mean"][k]


def test_without_matplotlib_only_the_chart_is_skipped(evaluation, tmp_path, monkeypatch):
    dialogues, summaries, scores, intervals = evaluation
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    note = report.write(str(tmp_path), dialogues, summaries, scores, intervals, [], META)
    assert note == (f'rouge.png skipped (matplotlib is not installed: pip install -e ".[plot]"); then: '
                    f"python -m dialsum_raw.plot {tmp_path} --out {tmp_path}/rouge.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "metrics.json",
        "report.md",
        "results.csv",
        "scores.csv",
    ]
    assert note in (tmp_path / "report.md").read_text()

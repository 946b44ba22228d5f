import numpy as np
import pytest
from rouge_score import rouge_scorer

from dialsum_raw.metrics import ROUGE_TYPES, bootstrap_interval, intervals, rouge, sentences_on_lines


def _oracle(pred, ref, stem=True):
    """rouge_score called directly on one pair, sentences on lines for rougeLsum."""
    s = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=stem).score(
        "\n".join(ref.replace(". ", ".\n").splitlines()), "\n".join(pred.replace(". ", ".\n").splitlines()))
    return {k: s[k].fmeasure for k in ROUGE_TYPES}


def test_every_score_equals_rouge_score_pair_by_pair(corpus):
    dialogues = corpus["test"][:40]
    preds = [d.refs[0].split(".")[0] + ". Then they leave." for d in dialogues]  # partial overlap
    refs = [d.refs for d in dialogues]
    for stem in (True, False):
        got = rouge(preds, refs, use_stemmer=stem)
        pairs = [[_oracle(p, r, stem) for r in rs] for p, rs in zip(preds, refs)]
        flat = [x for group in pairs for x in group]
        assert got["rows"] == 120 and got["dialogues"] == 40
        for k in ROUGE_TYPES:
            assert got["per_row"][k] == pytest.approx(sum(x[k] for x in flat) / len(flat), abs=1e-12)
            assert got["multi_ref_max"][k] == pytest.approx(
                sum(max(x[k] for x in g) for g in pairs) / 40, abs=1e-12
            )
            assert got["multi_ref_mean"][k] == pytest.approx(
                sum(sum(x[k] for x in g) / 3 for g in pairs) / 40, abs=1e-12
            )
            assert got["per_dialogue"]["best"][k] == pytest.approx(
                [max(x[k] for x in g) for g in pairs], abs=1e-12
            )
            assert got["per_dialogue"]["mean"][k] == pytest.approx(
                [sum(x[k] for x in g) / 3 for g in pairs], abs=1e-12
            )
        assert got["per_dialogue"]["refs"] == [3] * 40
    assert rouge(preds, refs, True)["per_row"]["rouge1"] != rouge(preds, refs, False)["per_row"]["rouge1"]


def test_rouge_lsum_uses_sentence_lines():
    assert sentences_on_lines("He came. She left! Why? ok") == "He came.\nShe left!\nWhy?\nok"
    pred, ref = "c d. a b.", "a b. c d."
    got = rouge([pred], [[ref]])["per_row"]
    assert got["rougeLsum"] == 1.0 and got["rougeL"] == 0.5  # per-sentence LCS vs whole-text LCS


def test_sentence_lines_change_only_rouge_lsum(corpus):
    """rouge1/2/L equal rouge_score on the texts as given (unsplit, as evaluate's rouge metric passes them);
    unsplit one-line texts give rougeLsum == rougeL, the report's note on the notebook's rougeLsum.
    evaluate.load('rouge') itself is not the oracle: it fetches its script from the Hub, offline here."""
    dialogues = corpus["test"][:10]
    preds = [d.refs[1] for d in dialogues]
    flat_p = [p for p, d in zip(preds, dialogues) for _ in d.refs]
    flat_r = [r for d in dialogues for r in d.refs]
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    rows = [scorer.score(r, p) for p, r in zip(flat_p, flat_r)]
    got = rouge(preds, [d.refs for d in dialogues])["per_row"]
    for k in ("rouge1", "rouge2", "rougeL"):
        assert got[k] == pytest.approx(sum(r[k].fmeasure for r in rows) / len(rows), abs=1e-12)
    assert all(r["rougeLsum"].fmeasure == r["rougeL"].fmeasure for r in rows)
    assert got["rougeLsum"] != pytest.approx(
        got["rougeL"], abs=1e-6
    )  # multi-sentence refs: splitting matters


def test_paired_bootstrap_covers_a_known_difference():
    """Per-dialogue scores vary far more between dialogues than between the two systems: only a paired
    resampling sees the true 0.02 gain as significant."""
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 1, 500)
    better = base + 0.02 + rng.normal(0, 0.01, 500)
    low, high = bootstrap_interval(better, base)
    assert low <= 0.02 <= high and low > 0
    assert high - low < 0.004


def test_bootstrap_identical_pair_contains_zero():
    scores = np.random.default_rng(2).uniform(0, 1, 100)
    low, high = bootstrap_interval(scores, scores.copy())
    assert low <= 0 <= high


def test_bootstrap_interval_is_a_95_percent_interval():
    """Its width matches the normal theory (2 x 1.96 sd / sqrt(n)), and over 300 samples with a known mean
    it covers that mean about 95% of the time."""
    x = np.random.default_rng(3).normal(0, 1, 400)
    low, high = bootstrap_interval(x, resamples=4000)
    assert high - low == pytest.approx(2 * 1.96 * x.std() / 20, rel=0.06)
    rng = np.random.default_rng(4)
    covered = [
        lo <= 0.3 <= hi for lo, hi in (bootstrap_interval(rng.normal(0.3, 1, 60), seed=i) for i in range(300))
    ]
    assert 0.91 <= np.mean(covered) <= 0.98


def test_intervals_weight_per_row_by_reference_count():
    """per_row counts a dialogue once per reference: 50 perfect single-reference dialogues and 50 zero-score
    three-reference ones give 0.25 per row but 0.5 per dialogue, and the intervals follow each."""
    preds, refs = ["a b"] * 50 + ["c d"] * 50, [["a b"]] * 50 + [["x", "y", "z"]] * 50
    scores = {"x": rouge(preds, refs), "y": rouge(["q"] * 100, refs)}
    assert scores["x"]["per_row"]["rouge1"] == 0.25 and scores["x"]["multi_ref_mean"]["rouge1"] == 0.5
    got = intervals(scores, [("x", "y"), ("x", "missing")], resamples=500)
    assert list(got["differences"]) == ["x vs y"] and got["resamples"] == 500
    for kind, truth in (("per_row", 0.25), ("multi_ref_mean", 0.5), ("multi_ref_max", 0.5)):
        for table in (got["models"]["x"], got["differences"]["x vs y"]):
            low, high = table[kind]["rouge1"]
            assert low < truth < high and high - low < 0.3
    assert got["models"]["x"]["per_row"]["rouge1"][1] < 0.4


def test_non_ascii_is_counted():
    assert rouge(["café au lait"], [["café"]])["non_ascii_texts"] == 2

import pytest
from rouge_score import rouge_scorer

from dialsum_raw.metrics import ROUGE_TYPES, rouge, sentences_on_lines


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
            assert got["multi_ref_max"][k] == pytest.approx(sum(max(x[k] for x in g) for g in pairs) / 40, abs=1e-12)
            assert got["multi_ref_mean"][k] == pytest.approx(sum(sum(x[k] for x in g) / 3 for g in pairs) / 40, abs=1e-12)
    assert rouge(preds, refs, True)["per_row"]["rouge1"] != rouge(preds, refs, False)["per_row"]["rouge1"]


def test_rouge_lsum_uses_sentence_lines():
    assert sentences_on_lines("He came. She left! Why? ok") == "He came.\nShe left!\nWhy?\nok"
    pred, ref = "c d. a b.", "a b. c d."
    got = rouge([pred], [[ref]])["per_row"]
    assert got["rougeLsum"] == 1.0 and got["rougeL"] == 0.5  # per-sentence LCS vs whole-text LCS


def test_evaluate_library_per_row_mean(corpus):
    """evaluate.load('rouge') with use_aggregator=False is rouge_score per row; its mean is our per_row."""
    dialogues = corpus["test"][:10]
    preds = [d.refs[1] for d in dialogues]
    flat_p = [p for p, d in zip(preds, dialogues) for _ in d.refs]
    flat_r = [r for d in dialogues for r in d.refs]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    rows = [scorer.score(r, p) for p, r in zip(flat_p, flat_r)]
    got = rouge(preds, [d.refs for d in dialogues])["per_row"]
    for k in ("rouge1", "rouge2", "rougeL"):
        assert got[k] == pytest.approx(sum(r[k].fmeasure for r in rows) / len(rows), abs=1e-12)


def test_non_ascii_is_counted():
    assert rouge(["café au lait"], [["café"]])["non_ascii_texts"] == 2

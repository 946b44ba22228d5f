"""ROUGE through rouge_score, pair by pair, aggregated two ways.

per_row: the mean over (dialogue, reference) rows, what evaluate.load("rouge") reports on the
hub's flattened test split (its default bootstrap aggregate is this mean up to resampling noise).
multi_ref_max / multi_ref_mean: per dialogue, the best / mean score over its references, then
the mean over dialogues. rouge_score's tokenizer keeps only [a-z0-9] words: other characters
(accents, CJK) are dropped from the comparison, which is why non-ASCII texts are counted.
"""

import re

from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def sentences_on_lines(text: str) -> str:
    """rougeLsum reads sentences as lines; split after . ! ? (a light stand-in for nltk's splitter)."""
    return "\n".join(s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s)


def pair_scores(predictions, references, use_stemmer=True) -> list:
    """F-measure of each rouge type for each (prediction, reference) pair."""
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    rows = []
    for pred, ref in zip(predictions, references, strict=True):
        s = scorer.score(sentences_on_lines(ref), sentences_on_lines(pred))
        rows.append({k: s[k].fmeasure for k in ROUGE_TYPES})
    return rows


def _mean(rows):
    return {k: sum(r[k] for r in rows) / len(rows) for k in ROUGE_TYPES} if rows else {k: 0.0 for k in ROUGE_TYPES}


def rouge(predictions, references, use_stemmer=True) -> dict:
    """predictions[i] is one summary; references[i] is the list of references of dialogue i."""
    flat_pred = [p for p, refs in zip(predictions, references, strict=True) for _ in refs]
    flat_ref = [r for refs in references for r in refs]
    rows = pair_scores(flat_pred, flat_ref, use_stemmer)
    per_dialogue, at = [], 0
    for refs in references:
        per_dialogue.append(rows[at:at + len(refs)])
        at += len(refs)
    return {
        "per_row": _mean(rows),
        "multi_ref_max": _mean([{k: max(r[k] for r in group) for k in ROUGE_TYPES} for group in per_dialogue]),
        "multi_ref_mean": _mean([_mean(group) for group in per_dialogue]),
        "rows": len(rows), "dialogues": len(references),
        "non_ascii_texts": sum(any(ord(c) > 127 for c in t) for t in flat_ref + list(predictions)),
    }

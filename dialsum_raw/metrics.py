"""ROUGE through rouge_score, pair by pair, aggregated three ways, and paired-bootstrap intervals.

per_row: the mean over (dialogue, reference) rows, the notebook's figure on the hub's flattened test
split. multi_ref_max / multi_ref_mean: per dialogue, the best / mean score over its references, then
the mean over dialogues. rougeLsum puts one sentence per line (split after . ! ?), as the HF
summarization examples do with nltk; evaluate.load('rouge') passes texts unsplit, so its rougeLsum
equals rougeL on single-line summaries. rouge_score's tokenizer keeps only [a-z0-9] words: other
characters (accents, CJK) are dropped from the comparison, which is why non-ASCII texts are counted.
"""

import re

import numpy as np

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
KINDS = ("per_row", "multi_ref_max", "multi_ref_mean")


def sentences_on_lines(text: str) -> str:
    """rougeLsum reads sentences as lines; split after . ! ? (a light stand-in for nltk's splitter)."""
    return "\n".join(s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s)


def pair_scores(predictions, references, use_stemmer=True) -> list:
    """F-measure of each rouge type for each (prediction, reference) pair. rouge_score (with nltk, 0.2 s)
    is imported here, so a training run without --eval-rouge never loads it."""
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    rows = []
    for pred, ref in zip(predictions, references, strict=True):
        s = scorer.score(sentences_on_lines(ref), sentences_on_lines(pred))
        rows.append({k: s[k].fmeasure for k in ROUGE_TYPES})
    return rows


def rouge(predictions, references, use_stemmer=True) -> dict:
    """predictions[i] is one summary; references[i] is the list of references of dialogue i.

    "per_dialogue" holds, per rouge type, each dialogue's best and mean score over its references
    and its reference count: the units the bootstrap resamples and scores.csv lists."""
    flat_pred = [p for p, refs in zip(predictions, references, strict=True) for _ in refs]
    flat_ref = [r for refs in references for r in refs]
    rows = pair_scores(flat_pred, flat_ref, use_stemmer)
    per_dialogue = {"refs": [len(refs) for refs in references], "best": {k: [] for k in ROUGE_TYPES},
                    "mean": {k: [] for k in ROUGE_TYPES}}
    at = 0
    for n in per_dialogue["refs"]:
        group, at = rows[at:at + n], at + n
        for k in ROUGE_TYPES:
            per_dialogue["best"][k].append(max(r[k] for r in group))
            per_dialogue["mean"][k].append(sum(r[k] for r in group) / n)
    result = {
        kind: {k: _weighted_mean(*_units(per_dialogue, kind, k)) for k in ROUGE_TYPES} for kind in KINDS
    }
    return {**result, "rows": len(rows), "dialogues": len(references), "per_dialogue": per_dialogue,
            "non_ascii_texts": sum(any(ord(c) > 127 for c in t) for t in flat_ref + list(predictions))}


def _units(per_dialogue, kind, rouge_type):
    """(per-dialogue values, weights) whose weighted mean is the `kind` aggregate: a dialogue counts
    once per reference for per_row, once otherwise."""
    if kind == "per_row":
        return per_dialogue["mean"][rouge_type], per_dialogue["refs"]
    return per_dialogue["best" if kind == "multi_ref_max" else "mean"][rouge_type], None


def _weighted_mean(values, weights=None):
    return float(np.average(values, weights=weights)) if len(values) else 0.0


def bootstrap_interval(values, baseline=None, weights=None, resamples=1000, seed=0, level=0.95):
    """Percentile interval of mean(values) - mean(baseline) (or of mean(values) alone) over dialogues
    drawn with replacement. Both systems are scored on the same draws (paired), so the
    between-dialogue spread that they share cancels: only their difference's noise is left."""
    x = np.asarray(values, dtype=float)
    if baseline is not None:
        x = x - np.asarray(baseline, dtype=float)
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=float)
    draws = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    stats = (x[draws] * w[draws]).sum(axis=1) / w[draws].sum(axis=1)
    low, high = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def intervals(scores, pairs, resamples=1000, seed=0, level=0.95) -> dict:
    """Bootstrap intervals for every model's score and every (a, b) difference, per aggregate and
    rouge type, from rouge()'s per_dialogue units; every interval uses the same draws."""
    def interval(a, b, kind, k):
        values, weights = _units(scores[a]["per_dialogue"], kind, k)
        baseline = None if b is None else _units(scores[b]["per_dialogue"], kind, k)[0]
        return list(bootstrap_interval(values, baseline, weights, resamples, seed, level))

    def table(a, b=None):
        return {kind: {k: interval(a, b, kind, k) for k in ROUGE_TYPES} for kind in KINDS}

    return {"resamples": resamples, "seed": seed, "level": level,
            "models": {name: table(name) for name in scores},
            "differences": {f"{a} vs {b}": table(a, b) for a, b in pairs if a in scores and b in scores}}

"""Where a fine-tuning update ΔW lives relative to the weight W0 it changes: the measures of Shuttleworth et
al., "LoRA vs Full Fine-tuning: An Illusion of Equivalence" (arXiv 2410.21228), and the major/minor split
behind PiSSA and MiCA. Every function takes W0 and ΔW as (out x in) tensors and works in float64.

- intruders: of the top k left singular vectors u_j of the merged W0 + ΔW (not of ΔW), the number whose best
  match among all of W0's left singular vectors, max_i |u_j . u0_i|, is below eps: new directions that
  fine-tuning put among the largest (the paper's Algorithm 1, with its k = 10 and eps = 0.5);
- stable_rank: ||ΔW||_F^2 / ||ΔW||_2^2, how many directions carry the update (1 for a rank-1 ΔW);
- top_share / bottom_share: ||U0_r^T ΔW||_F^2 / ||ΔW||_F^2 with U0_r W0's r largest (or smallest) left
singular
  directions: the part of the update that acts in W0's major (or minor) output directions.
"""

import torch

INTRUDER_K, INTRUDER_EPS = 10, 0.5  # the reference code's defaults (reeceshuttle/intruder-dimensions)


def _left(w):
    """W's left singular vectors as columns, largest singular value first (the thin SVD's min(out, in))."""
    return torch.linalg.svd(w.double(), full_matrices=False).U


def best_matches(w0, dw, k=INTRUDER_K):
    """max_i |u_j . u0_i| for the top k left singular vectors u_j of W0 + ΔW: 1 for one of W0's own
    directions."""
    w0 = w0.double()
    return (_left(w0 + dw.double())[:, :k].T @ _left(w0)).abs().amax(dim=1)


def intruders(w0, dw, k=INTRUDER_K, eps=INTRUDER_EPS) -> int:
    return int((best_matches(w0, dw, k) < eps).sum())


def stable_rank(dw) -> float:
    s = torch.linalg.svdvals(dw.double())
    return float((s ** 2).sum() / s[0] ** 2) if s[0] > 0 else 0.0  # an untrained update: no directions at all


def shares(w0, dw, r):
    """(top_share, bottom_share) of ΔW in W0's r largest and r smallest left singular directions; they sum to
    at most 1, and to 1 exactly when ΔW's columns lie in those 2r directions. r is capped at half of W0's
    directions (VeRA's rank 256 exceeds it on small layers), so the two spans never overlap."""
    u0, dw = _left(w0), dw.double()
    r = min(r, u0.shape[1] // 2)
    total = float(dw.norm() ** 2)
    if total == 0:
        return 0.0, 0.0
    return float((u0[:, :r].T @ dw).norm() ** 2) / total, float((u0[:, -r:].T @ dw).norm() ** 2) / total

"""Intruder dimensions, stable rank and the major/minor shares against closed forms."""

import pytest
import torch

from dialsum_raw import spectra


def _orthonormal(n, k, seed):
    return torch.linalg.qr(
        torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )[0]


@pytest.fixture
def w0():
    """W0 = U0 diag(s) V0^T, 40 x 40, distinct singular values 10 down to 0.1."""
    u0, v0, s = (
        _orthonormal(40, 40, 1),
        _orthonormal(40, 40, 2),
        torch.logspace(1, -1, 40, dtype=torch.float64),
    )
    return u0 * s @ v0.T, u0, s, v0


def test_update_along_w0s_own_top_directions_has_no_intruders(w0):
    w, u0, s, v0 = w0
    dw = (
        u0[:, :3] * torch.tensor([30.0, 20.0, 15.0], dtype=torch.float64) @ v0[:, :3].T
    )  # reorders the top, adds none
    assert spectra.best_matches(w, dw).min() == pytest.approx(1.0, abs=1e-9)
    assert spectra.intruders(w, dw) == 0


def test_rank1_update_outside_the_top_k_larger_than_sigma1_is_one_intruder(w0):
    """s x y^T with x, y spread evenly over W0's 30 bottom directions: W0 + ΔW splits into W0's top 10 (kept
    exactly) and a bottom block whose new largest direction is close to x, |x . u0_i| = 1/sqrt(30) < 0.5."""
    w, u0, s, v0 = w0
    x, y = u0[:, 10:].sum(1) / 30 ** 0.5, v0[:, 10:].sum(1) / 30 ** 0.5
    dw = 2 * s[0] * torch.outer(x, y)
    matches = spectra.best_matches(w, dw)
    assert matches[0] < 0.5 and (matches[1:] > 1 - 1e-9).all()
    assert spectra.intruders(w, dw) == 1
    assert spectra.intruders(w, dw, eps=0.1) == 0  # 1/sqrt(30) ~ 0.18 < its best match < 0.5
    assert spectra.intruders(w, dw / 100) == 0  # a small update stays below W0's top 10


def test_stable_rank(w0):
    x, y = torch.randn(40, dtype=torch.float64), torch.randn(30, dtype=torch.float64)
    assert spectra.stable_rank(torch.outer(x, y)) == pytest.approx(1.0, rel=1e-9)
    _, u0, _, v0 = w0
    dw = u0[:, :3] * torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64) @ v0[:, :3].T  # (4 + 1 + 1) / 4
    assert spectra.stable_rank(dw) == pytest.approx(1.5, rel=1e-9)
    assert spectra.stable_rank(torch.zeros(4, 3)) == 0.0


def test_shares_sum_to_one_inside_the_top_and_bottom_spans(w0):
    w, u0, _, v0 = w0
    g = torch.Generator().manual_seed(3)
    a, b = (
        torch.randn(4, 40, generator=g, dtype=torch.float64),
        torch.randn(4, 40, generator=g, dtype=torch.float64),
    )
    top, bottom = spectra.shares(w, u0[:, :4] @ a + u0[:, -4:] @ b, r=4)
    total = a.norm() ** 2 + b.norm() ** 2
    assert top == pytest.approx(float(a.norm() ** 2 / total), rel=1e-9)
    assert bottom == pytest.approx(float(b.norm() ** 2 / total), rel=1e-9)
    assert top + bottom == pytest.approx(1.0, rel=1e-9)
    top, bottom = spectra.shares(w, torch.randn(40, 40, generator=g, dtype=torch.float64), r=4)
    assert 0 < top + bottom < 1 and top == pytest.approx(
        4 / 40, abs=0.06
    )  # a random update: about r / n each
    assert spectra.shares(w, torch.zeros(40, 40), r=4) == (0.0, 0.0)


def test_shares_never_overlap_when_r_exceeds_half_the_directions(w0):
    """VeRA's rank (256) exceeds half of a small layer's directions: the spans are capped at n // 2 each,
    so a random update splits into halves that still sum to at most 1."""
    w, u0, _, _ = w0
    n = u0.shape[1]
    dw = torch.randn(40, 40, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    top, bottom = spectra.shares(w, dw, r=256)
    assert (top, bottom) == spectra.shares(w, dw, r=n // 2)
    assert top + bottom <= 1 + 1e-12

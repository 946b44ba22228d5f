"""The inspector on a full fine-tune, and between an adapter and a full fine-tune, against closed forms: every
update here is built from W0's own singular vectors, so its figures are known before the inspector runs."""

import json

import pytest
import torch

from dialsum_raw import lora
from dialsum_raw.errors import UserError
from dialsum_raw.lora import LoRAConfig
from dialsum_raw.lora import inspect as lora_inspect
from dialsum_raw.modeling import load_model

SIGMA = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)  # distinct: every singular vector is defined


def _svd(w):
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return u, s, vh.T


def aligned(w0):
    """(U, V) factors of ΔW = U0_4 diag(SIGMA) V0_4^T: W0's own top 4 directions, so W0 + ΔW has no new
    ones."""
    u0, _, v0 = _svd(w0)
    return u0[:, :4] * SIGMA, v0[:, :4]


def same_left(w0):
    """ΔW = U0_4 diag(SIGMA) R^T with R random: the left directions of `aligned`, other right ones."""
    u0, _, _ = _svd(w0)
    r = torch.linalg.qr(
        torch.randn(w0.shape[1], 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    )[0]
    return u0[:, :4] * SIGMA, r


def intruder(w0):
    """ΔW = 2 sigma1 x y^T, x and y spread evenly over W0's directions 11..n: exactly one intruder among the
    top 10, and |U0_4^T x|^2 = 0 (top), |U0_last4^T x|^2 = 4 / (n - 10) (bottom)."""
    u0, s0, v0 = _svd(w0)
    x, y = u0[:, 10:].sum(1), v0[:, 10:].sum(1)
    return 2 * s0[0] * x[:, None] / x.norm(), y[:, None] / y.norm()


def _full(tiny, folder, q, v):
    """A full fine-tune's model folder: W0 + B A^T on every q (and v) layer, (B, A) = q(W0) (and v(W0))."""
    model = load_model(tiny)
    with torch.no_grad():
        for name in lora.target_layers(model, ("q", "v")):
            w = model.get_submodule(name).weight
            b, a = (q if name.endswith(".q") else v)(w)
            w.add_((b @ a.T).to(w.dtype))
    model.save_pretrained(folder)
    return str(folder)


def _adapter(tiny, folder, make):
    """A rank-4 adapter with s B A = B' A'^T, (B', A') = make(W0), on every q and v layer."""
    model = load_model(tiny)
    lora.inject(model, LoRAConfig(("q", "v"), 4, 8))
    with torch.no_grad():
        for _, m in lora.lora_layers(model):
            b, a = make(m.base.weight)
            m.lora_A.copy_(a.T)
            m.lora_B.copy_(b / m.scaling)
    lora.save_adapter(model, folder, base_model=tiny)
    return str(folder)


def test_full_finetune_figures_in_closed_form(tiny, tmp_path):
    full = _full(tiny, tmp_path / "full", q=aligned, v=intruder)
    records, cfg, other = lora_inspect.inspect(tiny, full, rank=4)
    assert other is None and (cfg.targets, cfg.rank) == (("q", "v"), 4)
    assert len(records) == 12 and all(list(r) == list(lora_inspect.KEYS) for r in records)
    for r in records:
        if r["layer"].endswith(".q"):  # along W0's top directions
            assert r["singular_values"] == pytest.approx(SIGMA.tolist(), rel=1e-4)
            assert r["stable_rank"] == pytest.approx(30 / 16, rel=1e-4)  # (16 + 9 + 4 + 1) / 16
            assert r["intruders"] == 0
            assert (r["top_share"], r["bottom_share"]) == (
                pytest.approx(1, rel=1e-5),
                pytest.approx(0, abs=1e-6),
            )
        else:  # rank 1, outside the top 10, larger than sigma1
            assert r["stable_rank"] == pytest.approx(1, rel=1e-4)
            assert r["intruders"] == 1
            assert r["top_share"] == pytest.approx(0, abs=1e-6)
            assert r["bottom_share"] == pytest.approx(
                4 / 54, rel=1e-4
            )  # q and v of the tiny model are 64 x 64
    records, _, _ = lora_inspect.inspect(tiny, full, rank=4, intruder_eps=0.1)
    assert all(
        r["intruders"] == 0 for r in records
    )  # the intruder's best match, about 1/sqrt(54), is above 0.1
    records, cfg, _ = lora_inspect.inspect(tiny, full, targets=("q",))
    assert cfg.rank == lora_inspect.FULL_RANK and [r["layer"][-2:] for r in records] == [".q"] * 6


def test_adapter_against_full_finetune(tiny, tmp_path):
    """phi compares left-singular vectors when a full fine-tune is involved: the same left directions give 1
    everywhere (their right ones are unrelated); the compared run's intruders stand beside the adapter's."""
    adapter = _adapter(tiny, tmp_path / "ad", aligned)
    same = _full(tiny, tmp_path / "same", q=same_left, v=same_left)
    records, cfg, other = lora_inspect.inspect(tiny, adapter, compare=same)
    assert (other.targets, other.rank) == (("q", "v"), 4)  # the full fine-tune takes the adapter's
    for r in records:
        assert torch.allclose(
            torch.tensor(r["phi"], dtype=torch.float64), torch.ones(4, 4, dtype=torch.float64)
        )
        assert (r["intruders"], r["compare_intruders"]) == (0, 0)
    other_dirs = _full(tiny, tmp_path / "other", q=intruder, v=intruder)
    records, _, _ = lora_inspect.inspect(tiny, adapter, compare=other_dirs)
    for r in records:
        assert (r["intruders"], r["compare_intruders"]) == (0, 1)
        assert r["phi"][0][0] == pytest.approx(0, abs=1e-6)  # x lies outside W0's top 4 left directions


def test_cli_json_table_plot_and_errors(tiny, tmp_path, capsys):
    adapter = _adapter(tiny, tmp_path / "ad", aligned)
    full = _full(tiny, tmp_path / "full", q=aligned, v=intruder)
    lora.main(["inspect", full, "--base", tiny, "--compare", adapter, "--json"])
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert all(list(r) == [*lora_inspect.KEYS, "phi", "compare_intruders"] for r in records)
    assert [r["intruders"] for r in records[:2]] == [0, 1]  # encoder block 0: q, then v
    lora.main(["inspect", adapter, "--base", tiny, "--compare", full, "--plot", str(tmp_path / "plots")])
    out = capsys.readouterr()
    assert "full fine-tune, ΔW = W_ft - W0 on q,v" in out.out and "left-singular vectors" in out.out
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"rel_norm.png", "intruders.png", "phi.png"}
    with pytest.raises(UserError, match="neither an adapter"):
        lora.main(["inspect", str(tmp_path), "--base", tiny])
    with pytest.raises(UserError, match="--intruder-eps in"):
        lora.main(["inspect", full, "--base", tiny, "--intruder-eps", "0"])

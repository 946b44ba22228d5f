"""The adapter inspector against closed forms (chosen spectra, identical and random subspaces)."""

import json
import math
import sys

import pytest
import torch

from dialsum_raw import lora
from dialsum_raw.lora import LoRAConfig
from dialsum_raw.lora import inspect as lora_inspect
from dialsum_raw.errors import UserError
from dialsum_raw.modeling import load_model


def _orthonormal(n, k, seed):
    return torch.linalg.qr(
        torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )[0]


def _adapter_with_spectrum(tiny, directory, sigma, rank=4, alpha=8, seed=0):
    """An adapter whose every layer has s B A = U diag(sigma) V^T for chosen orthonormal U, V."""
    model = load_model(tiny)
    lora.inject(model, LoRAConfig(("q", "v"), rank, alpha))
    with torch.no_grad():
        for i, (_, m) in enumerate(lora.lora_layers(model)):
            u, v = (
                _orthonormal(m.base.out_features, rank, seed + i),
                _orthonormal(m.base.in_features, rank, 99 + i),
            )
            m.lora_A.copy_(v.T)
            m.lora_B.copy_(u * torch.tensor(sigma, dtype=torch.float64) / m.scaling)
    lora.save_adapter(model, directory, base_model=tiny)
    return model


def test_chosen_spectrum_is_reported_exactly(tiny, tmp_path):
    sigma = [4.0, 2.0, 1.0, 1.0]  # p = (1/2, 1/4, 1/8, 1/8): entropy 1.75 ln 2, effective rank 2^1.75
    _adapter_with_spectrum(tiny, tmp_path / "ad", sigma)
    records, cfg, _ = lora_inspect.inspect(tiny, tmp_path / "ad")
    base = load_model(tiny)
    assert len(records) == 12 and cfg.rank == 4
    for r in records:
        assert set(r) == set(lora_inspect.KEYS)
        assert r["singular_values"] == pytest.approx(sigma, rel=1e-6)
        assert r["fro_norm"] == pytest.approx(math.sqrt(22), rel=1e-6)
        assert r["effective_rank"] == pytest.approx(2 ** 1.75, rel=1e-6)
        assert r["rel_norm"] == pytest.approx(
            r["fro_norm"] / base.get_submodule(r["layer"]).weight.norm().item(), rel=1e-6
        )


def test_effective_rank_extremes():
    assert lora_inspect.effective_rank(torch.tensor([3.0, 3.0, 3.0, 3.0])) == pytest.approx(4.0)
    assert lora_inspect.effective_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert lora_inspect.effective_rank(torch.zeros(4)) == 0.0  # an untrained adapter: no update at all


def test_amplification_small_along_w_and_large_across_it():
    """W = U diag(w) V^T. For ΔW along W's top-2 directions U_r^T W V_r = diag(w1, w2); along its bottom-2,
    diag(w63, w64)."""
    n, sigma = 64, torch.tensor([0.3, 0.2], dtype=torch.float64)
    u, v = _orthonormal(n, n, 1), _orthonormal(n, n, 2)
    w_sv = torch.logspace(1, -2, n, dtype=torch.float64)  # 10 down to 0.01
    w = u * w_sv @ v.T
    aligned = lora_inspect.layer_stats(w, u[:, :2] * sigma @ v[:, :2].T, k=2)
    across = lora_inspect.layer_stats(w, u[:, -2:] * sigma @ v[:, -2:].T, k=2)
    assert aligned["amplification"] == pytest.approx(sigma.norm().item() / w_sv[:2].norm().item(), rel=1e-9)
    assert across["amplification"] == pytest.approx(sigma.norm().item() / w_sv[-2:].norm().item(), rel=1e-9)
    assert aligned["amplification"] < 0.05 and across["amplification"] > 10


def test_phi_of_an_adapter_with_itself_is_one(tiny, tmp_path):
    _adapter_with_spectrum(tiny, tmp_path / "ad", [4.0, 3.0, 2.0, 1.0])
    records, _, other = lora_inspect.inspect(tiny, tmp_path / "ad", compare=tmp_path / "ad")
    assert other.rank == 4
    for r in records:
        assert torch.allclose(
            torch.tensor(r["phi"], dtype=torch.float64), torch.ones(4, 4, dtype=torch.float64)
        )


def test_phi_of_random_subspaces_matches_its_expectation():
    """For a fixed i-dim subspace and a uniformly random j-dim one in R^n, E[P_j] = (j/n) I, so
    E||U_i^T U_j||_F^2 = i j / n and E[phi(i, j)] = max(i, j) / n. Gaussian A has a uniformly random row
    space."""
    n, draws = 32, 400
    g = torch.Generator().manual_seed(0)
    phis = torch.stack(
        [
            lora_inspect.subspace_similarity(torch.randn(4, n, generator=g), torch.randn(8, n, generator=g))
            for _ in range(draws)
        ]
    )
    i = torch.arange(1, 5, dtype=torch.float64)[:, None]
    j = torch.arange(1, 9, dtype=torch.float64)[None, :]
    expect = torch.maximum(i, j) / n
    standard_error = phis.std(0) / math.sqrt(draws)
    assert ((phis.mean(0) - expect).abs() <= 4 * standard_error + 1e-12).all()
    assert phis.mean(0)[0, 0] < 0.1 and phis.mean(0)[-1, -1] == pytest.approx(8 / 32, abs=0.02)


@pytest.mark.parametrize(
    "variant",
    [
        {"variant": "dora", "init": "pissa"},
        {"init": "olora"},
        {"init": "mica"},
        {"variant": "vera", "vera_rank": 4},
    ],
)
def test_updates_are_the_merged_change_of_the_original_weights(tiny, tmp_path, variant):
    """Read through each layer's delta_weight(): DoRA's rescaling, the residual W of PiSSA and OLoRA, MiCA's
    frozen B, VeRA's shared projections."""
    torch.manual_seed(0)
    model = load_model(tiny)
    lora.inject(model, LoRAConfig(("q", "v"), 4, 8, **variant))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # what training moves: A, B, m, λ
                p.add_(0.05 * torch.randn_like(p))
    lora.save_adapter(model, tmp_path / "ad", base_model=tiny)
    original = load_model(tiny)
    weights = {n: p.clone() for n, p in original.named_parameters()}
    cfg, updates = lora_inspect.adapter_updates(original, tmp_path / "ad")
    assert cfg.rank == 4 and len(updates) == 12
    lora.merge(model)
    for name, w, dw, k in updates:
        merged = model.get_submodule(name).base.weight.double()
        assert torch.equal(w, weights[f"{name}.weight"].double()) and k == 4
        assert (dw - (merged - w)).abs().max() < 1e-5
        assert dw.abs().max() > 1e-3  # the adapter does change W


def test_cli_table_json_and_plots(tiny, tmp_path, capsys):
    _adapter_with_spectrum(tiny, tmp_path / "r4", [4.0, 2.0, 1.0, 1.0])
    _adapter_with_spectrum(tiny, tmp_path / "r8", [1.0] * 8, rank=8, seed=50)
    lora.main(["inspect", str(tmp_path / "r4"), "--base", tiny, "--compare", str(tmp_path / "r8"),
               "--plot", str(tmp_path / "plots")])
    out = capsys.readouterr()
    groups = [
        line
        for line in out.out.splitlines()
        if line in ("encoder self-attention", "decoder self-attention", "cross-attention")
    ]
    assert groups == ["encoder self-attention", "decoder self-attention", "cross-attention"]
    assert "phi(1,1)" in out.out and "wrote" in out.err
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"rel_norm.png", "intruders.png", "phi.png"}
    lora.main(["inspect", str(tmp_path / "r4"), "--base", tiny, "--json"])
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(records) == 12 and all(list(r) == list(lora_inspect.KEYS) for r in records)
    assert records[0]["layer"] == "encoder.block.0.layer.0.SelfAttention.q"


def test_plot_without_matplotlib_says_what_to_install(tiny, tmp_path, monkeypatch):
    _adapter_with_spectrum(tiny, tmp_path / "ad", [1.0] * 4)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(UserError, match=r'--plot needs matplotlib: pip install -e "\.\[plot\]"'):
        lora.main(["inspect", str(tmp_path / "ad"), "--base", tiny, "--plot", str(tmp_path / "plots")])

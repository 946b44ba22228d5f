"""lora combine: each method against its oracle (the inputs' own models, the weighted ΔW sum, peft's svd, the
TIES and DARE formulas written out here), and the combined adapter read by every tool."""

import json
import re

import pytest
import torch
from conftest import randomize_adapter
from test_lora import _inputs

from dialsum_raw import lora
from dialsum_raw.errors import UserError
from dialsum_raw.lora import LoRAConfig
from dialsum_raw.lora.combine import combine
from dialsum_raw.modeling import load_model

FULL = 64  # the tiny stand-in's q and v are 64 x 64: rank 64 is every layer's full rank


def _adapter(tiny, path, seed, targets=("q", "v"), rank=4, **fields):
    model = load_model(tiny).eval()
    lora.inject(model, LoRAConfig(targets, rank, 8, **fields))
    randomize_adapter(model, seed)
    lora.save_adapter(model, path, base_model=tiny)
    return str(path)


def _on_base(tiny, directory, merged=False):
    model = load_model(tiny).eval()
    lora.load_adapter(model, directory)
    if merged:
        lora.merge(model)
    return model


def _deltas(tiny, directory):
    """{layer: ΔW} of an adapter against the tiny base (fp64)."""
    model = load_model(tiny)
    cfg, tensors = lora.check_adapter(model, directory)
    return {name: dw for name, dw, _ in lora.updates(model, cfg, tensors)}


@pytest.mark.parametrize(
    "fields, method",
    [
        ({"rslora": True}, "linear"),
        ({"rslora": True}, "svd"),
        ({"variant": "dora"}, "linear"),
        ({"init": "pissa", "rslora": True}, "linear"),
        ({"init": "olora", "variant": "dora"}, "linear"),
        ({"variant": "vera"}, "linear"),
    ],
    ids=["rslora", "rslora-svd", "dora", "pissa+rslora", "olora+dora", "vera"],
)
def test_one_adapter_alone_at_weight_one_is_the_adapter(tiny, tmp_path, fields, method):
    """peft #3761: add_weighted_adapter of one rsLoRA adapter alone at weight 1.0 is 0.42 relative off. Here
    the combined plain-LoRA adapter at full rank gives the original adapter's logits, unmerged (its own
    forward) and merged."""
    ad = _adapter(tiny, tmp_path / "ad", 1, **fields)
    cfg, _ = combine([ad], str(tmp_path / "one"), method, weights=[1.0], rank=FULL)
    assert cfg.variant == "lora" and cfg.init == "kaiming" and not cfg.rslora and cfg.rank == FULL
    x = _inputs()
    with torch.no_grad():
        combined = _on_base(tiny, tmp_path / "one", merged=True)(**x).logits
        for merged in (False, True):
            diff = (combined - _on_base(tiny, ad, merged)(**x).logits).abs().max().item()
            print(f"combined alone vs the {fields} adapter {'merged' if merged else 'unmerged'}: {diff:.1e}")
            assert diff <= 1e-5


def test_default_rank_is_exact_and_a_soup_of_rank_r_adapters_has_rank_n_r(tiny, tmp_path):
    ads = [_adapter(tiny, tmp_path / f"s{i}", i) for i in (1, 2, 3)]
    cfg, error = combine(ads, str(tmp_path / "soup"), "linear")
    assert cfg.rank == 12 and error < 1e-6  # three rank-4 updates
    want = [_deltas(tiny, a) for a in ads]
    got = _deltas(tiny, tmp_path / "soup")
    assert max((got[n] - sum(d[n] for d in want) / 3).abs().max().item() for n in got) <= 1e-6
    _, error = combine(ads, str(tmp_path / "low"), "linear", rank=2)
    assert 0.1 < error < 1  # the best rank-2 approximation of a rank-12 sum loses a real share


def test_cat_equals_the_weighted_sum_of_updates(tiny, tmp_path):
    """cat stacks the saved factors; an rsLoRA, a PiSSA (saved at rank 2r for the original base) and a rank-2
    input."""
    ads = [_adapter(tiny, tmp_path / "a", 1, rslora=True), _adapter(tiny, tmp_path / "b", 2, init="pissa"),
           _adapter(tiny, tmp_path / "c", 3, rank=2)]
    weights = [0.7, -0.4, 1.3]
    cfg, _ = combine(ads, str(tmp_path / "cat"), "cat", weights=weights)
    assert cfg.rank == 4 + 8 + 2 and cfg.variant == "lora"
    want = [_deltas(tiny, a) for a in ads]
    got = _deltas(tiny, tmp_path / "cat")
    diff = max((got[n] - sum(w * d[n] for w, d in zip(weights, want))).abs().max().item() for n in got)
    print(f"cat vs the weighted sum of ΔW: {diff:.1e}")
    assert diff <= 1e-6


@pytest.mark.peft
@pytest.mark.parametrize("rank", [8, 3])
def test_svd_equals_peft_add_weighted_adapter(tiny, tmp_path, rank):
    """peft 0.21.2 add_weighted_adapter(combination_type="svd") on two plain LoRA adapters: the same logits,
    at the exact rank (4 + 4) and truncated to 3."""
    from peft import PeftModel
    ads = [_adapter(tiny, tmp_path / "a", 1), _adapter(tiny, tmp_path / "b", 2)]
    for a in ads:
        lora.export_peft(a, f"{a}-peft")
    weights = [0.7, -0.4]
    combine(ads, str(tmp_path / "svd"), "svd", weights=weights, rank=rank)
    via_peft = PeftModel.from_pretrained(load_model(tiny), f"{ads[0]}-peft", adapter_name="a").eval()
    via_peft.load_adapter(f"{ads[1]}-peft", adapter_name="b")
    via_peft.add_weighted_adapter(["a", "b"], weights, "mix", combination_type="svd", svd_rank=rank)
    via_peft.set_adapter("mix")
    x = _inputs()
    with torch.no_grad():
        diff = (via_peft(**x).logits - _on_base(tiny, tmp_path / "svd")(**x).logits).abs().max().item()
    print(f"svd rank {rank} vs peft add_weighted_adapter: {diff:.1e}")
    assert diff <= 1e-5


def _ties_formula(deltas, weights, density):
    """TIES (Yadav et al., 2023) as peft computes it, element by element over flat lists."""
    flat = [d.flatten().tolist() for d in deltas]
    k = int(density * len(flat[0]))
    trimmed = []
    for values in flat:
        keep = set(sorted(range(len(values)), key=lambda i: -abs(values[i]))[:k])
        trimmed.append([v if i in keep else 0.0 for i, v in enumerate(values)])
    out = []
    for i in range(len(flat[0])):
        sign = 1.0 if sum(t[i] for t in trimmed) >= 0 else -1.0
        agree = [(w, t[i]) for w, t in zip(weights, trimmed) if t[i] != 0 and (t[i] > 0) == (sign > 0)]
        out.append(sum(w * v for w, v in agree) / max(1, len(agree)))
    return torch.tensor(out, dtype=torch.float64).view_as(deltas[0])


def test_ties_equals_the_written_out_formula(tiny, tmp_path):
    ads = [_adapter(tiny, tmp_path / f"t{i}", i, targets=("q",)) for i in (1, 2, 3)]
    weights, density = [0.5, 1.0, 0.8], 0.3
    combine(ads, str(tmp_path / "ties"), "ties", weights=weights, density=density)
    want = [_deltas(tiny, a) for a in ads]
    got = _deltas(tiny, tmp_path / "ties")
    for name, dw in got.items():
        expect = _ties_formula([d[name] for d in want], weights, density)
        assert (dw - expect).abs().max().item() <= 1e-6, name
    assert (got[name].abs() > 1e-6).float().mean() < 0.7  # trimmed: the union of three 30% supports (~66%)


def test_dare_equals_the_written_out_formula_and_a_seed_gives_one_adapter(tiny, tmp_path):
    ads = [_adapter(tiny, tmp_path / "a", 1), _adapter(tiny, tmp_path / "b", 2, targets=("q", "k"))]
    weights, density = [0.6, 0.9], 0.25
    for out, seed in (("d1", 5), ("d2", 5), ("d3", 6)):
        combine(ads, str(tmp_path / out), "dare", weights=weights, density=density, seed=seed)
    want = [_deltas(tiny, a) for a in ads]
    got = _deltas(tiny, tmp_path / "d1")
    g = torch.Generator().manual_seed(5)  # the documented order: layers in model order, inputs in order
    model = load_model(tiny)
    for name in (n for n, _ in model.named_modules() if n in got):
        expect = 0
        for w, d in zip(weights, want):
            dw = d.get(name, torch.zeros_like(got[name]))
            expect = (
                expect + w * dw * (torch.rand(dw.shape, generator=g, dtype=torch.float64) < density) / density
            )
        assert (got[name] - expect).abs().max().item() <= 1e-6, name
    assert {n.rsplit(".", 1)[-1] for n in got} == {"q", "k", "v"}  # v and k come from one input each
    files = [(tmp_path / out / "adapter.safetensors").read_bytes() for out in ("d1", "d2", "d3")]
    assert files[0] == files[1] and files[0] != files[2]


@pytest.mark.peft
def test_combined_adapter_is_read_by_inspect_merge_and_export_peft(tiny, tmp_path, capsys):
    from peft import PeftModel
    from dialsum_raw.lora import main
    ads = [_adapter(tiny, tmp_path / f"s{i}", i) for i in (1, 2)]
    main(["combine", *ads, "--out", str(tmp_path / "soup"), "--method", "linear"])
    assert "plain LoRA, rank 8, on q,v (linear of 2;" in capsys.readouterr().out
    saved = json.loads((tmp_path / "soup" / "adapter.json").read_text())
    assert saved["base_model"] == tiny and saved["variant"] == "lora" and saved["rank"] == 8
    main(["inspect", str(tmp_path / "soup"), "--base", tiny])
    assert "eff_rank" in capsys.readouterr().out
    main(["merge", "--base", tiny, "--adapter", str(tmp_path / "soup"), "--out", str(tmp_path / "merged")])
    main(["export-peft", "--adapter", str(tmp_path / "soup"), "--out", str(tmp_path / "peft")])
    x = _inputs()
    with torch.no_grad():
        expect = _on_base(tiny, tmp_path / "soup")(**x).logits
        assert (load_model(str(tmp_path / "merged")).eval()(**x).logits - expect).abs().max() <= 1e-5
        via_peft = PeftModel.from_pretrained(load_model(tiny), tmp_path / "peft").eval()
        assert (via_peft(**x).logits - expect).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "case, message",
    [
        (
            "bases",
            r"trained on different bases: \S+/a on \S+, \S+/b on elsewhere/t5; combine adapters of one base",
        ),
        ("cat dora", r"cat concatenates plain LoRA factors, and \S+/b is dora: use --method linear"),
        ("cat targets", r"cat needs the same targets in every adapter: \S+/a has q,v, \S+/b has q,k"),
        ("density", r"--method ties needs --density"),
        ("weights", r"--weights has 3 values for 2 adapters"),
        ("exists", r"--out \S+ already exists"),
    ],
)
def test_bad_inputs_are_one_line_before_any_work(tiny, tmp_path, capsys, case, message):
    from dialsum_raw.errors import run_cli
    from dialsum_raw.lora import main
    a = _adapter(tiny, tmp_path / "a", 1)
    b = _adapter(tiny, tmp_path / "b", 2, targets=("q", "k") if case == "cat targets" else ("q", "v"),
                 **({"variant": "dora"} if case == "cat dora" else {}))
    if case == "bases":
        cfg = tmp_path / "b" / "adapter.json"
        cfg.write_text(cfg.read_text().replace(json.dumps(tiny), '"elsewhere/t5"'))
    out = tmp_path / "out"
    if case == "exists":
        out.mkdir()
    args = [
        "combine",
        a,
        b,
        "--out",
        str(out),
        "--method",
        {"density": "ties"}.get(case, "cat" if "cat" in case else "linear"),
    ]
    if case == "weights":
        args += ["--weights", "1,2,3"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(main, args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: ") and re.search(message, err), err
    assert not (tmp_path / "out.tmp").exists() and (case == "exists") == out.exists()
    with pytest.raises(UserError):
        combine([a], str(tmp_path / "x"), "dare", density=1.5)


def test_applied_adapter_leaves_the_base_bit_for_bit(tiny, tmp_path):
    """Evaluation applies adapters one after another to one base: merged PiSSA+DoRA in, then out, leaves every
    weight and requires_grad flag as it was (a merge + unmerge would round W)."""
    ad = _adapter(tiny, tmp_path / "p", 1, init="pissa", variant="dora")
    model = load_model(tiny)
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    cfg, tensors = lora.check_adapter(model, ad)
    with lora.applied(model, cfg, tensors, merged=True):
        q = model.encoder.block[0].layer[0].SelfAttention.q
        assert q.merged and not torch.equal(
            q.base.weight, before["encoder.block.0.layer.0.SelfAttention.q.weight"][0]
        )
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and not lora.lora_layers(model)
    assert all(torch.equal(after[n], w) and after[n].requires_grad == g for n, (w, g) in before.items())

"""The layer contract (lora.layers.AdapterLinear), for every variant x every init it allows, both found in
the registries (VARIANTS, INITS, and check() for which pairs exist): a new class in VARIANTS is tested here
without an edit to this file. The oracles are the layer's own base (start, merge), its fp32 formula
(delta_weight), the run that never stopped (resume) and peft (export)."""

import copy
import os
import re

import pytest
import torch
from conftest import REPO, randomize_adapter

from dialsum_raw import checkpoint, lora, sharding
from dialsum_raw.config import Settings
from dialsum_raw.errors import UserError
from dialsum_raw.lora import INITS, VARIANTS, LoRAConfig, layers
from dialsum_raw.lora import inspect as lora_inspect
from dialsum_raw.modeling import load_model
from dialsum_raw.training import build_model, make_optimizer

TARGETS = ("q", "v", "wo")  # square attention and the non-square feed-forward output (128 -> 64)


def _allowed(variant, init):
    try:
        _settings(variant, init).lora_config()
        return True
    except UserError:
        return False


def _settings(variant, init, tiny=None, ratio=1.0):
    """The loop's own settings; rank 4, alpha 8 (scale 2, so a forgotten scale shows), dropout off."""
    return Settings(model=tiny, lora_rank=4, lora_alpha=8, lora_dropout=0.0, dropout=0.0,
                    lora_targets=TARGETS,
                    lora_variant=variant, lora_init=init, vera_rank=16, lr=1e-2, weight_decay=0.1,
                    lora_plus_ratio=ratio)


CASES = [(v, i) for v in VARIANTS for i in INITS if _allowed(v, i)]


@pytest.fixture(scope="module")
def base_model(tiny):
    """The tiny base, loaded once; each use takes a copy (load_model runs where the loop's own path does)."""
    return load_model(tiny, dropout=0.0).eval()


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(2, 32000, (2, 12), generator=g),
            "attention_mask": torch.ones(2, 12, dtype=torch.long),
            "decoder_input_ids": torch.randint(2, 32000, (2, 5), generator=g)}


def _logits(model):
    with torch.no_grad():
        return model(**_inputs()).logits


def _close(a, b):
    """Equal up to fp32 rounding through the network: 1e-5 of the largest logit (about 5 here), >= 1e-5."""
    return (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item())


def _step(model, optimizer, seed):
    x = _inputs(seed)
    labels = x.pop("decoder_input_ids")
    model(**x, labels=labels).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def _fast_trains(model):
    return any(p.requires_grad and n in m.FAST for _, m in lora.lora_layers(model)
               for n, p in m.named_parameters(recurse=False))


@pytest.mark.parametrize("variant,init", CASES, ids=[f"{v}-{i}" for v, i in CASES])
def test_layer_contract(tiny, base_model, tmp_path, variant, init):
    check_contract(tiny, base_model, tmp_path, variant, init)


@pytest.mark.peft
@pytest.mark.parametrize("variant,init", CASES, ids=[f"{v}-{i}" for v, i in CASES])
def test_export_peft_contract(tiny, base_model, tmp_path, variant, init):
    check_export(base_model, tiny, tmp_path, variant, init)


def check_contract(tiny, base_model, tmp_path, variant, init):
    settings = _settings(variant, init, tiny)
    cfg = settings.lora_config()
    model = copy.deepcopy(base_model)
    base = _logits(model)
    lora.inject(model, cfg)
    layers = lora.lora_layers(model)
    assert {name.rsplit(".", 1)[1] for name, _ in layers} == set(TARGETS)

    # what the class declares is what it has: trainable(cfg) trains, and nothing else does
    for _, m in layers:
        own = {n for n, _ in m.named_parameters(recurse=False)}
        declared = type(m).trainable(cfg)
        assert declared and declared <= own and set(m.FAST) | set(m.NO_DECAY) <= own, (declared, own)
        assert {n for n, p in m.named_parameters(recurse=False) if p.requires_grad} == declared
        assert not any(p.requires_grad for p in m.base.parameters())

    # starts equal to its base; every trained tensor moved, the adapter acts
    assert _close(_logits(model), base)
    randomize_adapter(model)
    unmerged = _logits(model)
    assert (unmerged - base).abs().max() > 1e-3

    # delta_weight() in fp32 under bf16 autocast is the merged change; merge and unmerge are exact round trips
    before = {name: m.base.weight.detach().clone() for name, m in layers}
    exact = {name: m.delta_weight().detach() for name, m in layers}
    with torch.autocast("cpu", torch.bfloat16):
        deltas = {name: m.delta_weight().detach() for name, m in layers}
        lora.merge(model)
        lora.merge(model)
    for name, m in layers:
        d = deltas[name]
        assert d.dtype == torch.float32 and torch.equal(d, exact[name]), name  # autocast changed nothing
        tol = 4 * torch.finfo(torch.float32).eps * before[name].abs().max()  # one fp32 rounding of W + ΔW
        assert (m.base.weight - before[name] - d).abs().max() <= tol, name
    assert _close(_logits(model), unmerged)
    lora.unmerge(model)
    lora.unmerge(model)
    assert all((m.base.weight - before[name]).abs().max() <= 1e-6 for name, m in layers)
    assert _close(_logits(model), unmerged)

    # save and load: exact; the loaded model (never merged, so its W is the base's to the bit) trains on below
    lora.save_adapter(model, tmp_path / "ad", base_model=tiny)
    run = copy.deepcopy(base_model)
    lora.load_adapter(run, tmp_path / "ad")
    assert torch.equal(_logits(run), unmerged)
    layers = lora.lora_layers(run)

    # inspect reads every layer's update: ΔW against the original W (W - W0 after a residual init, plus
    # delta_weight)
    records = lora_inspect.inspect(tiny, str(tmp_path / "ad"))[0]
    assert [r["layer"] for r in records] == list(before)
    for r in records:
        w0 = base_model.get_submodule(r["layer"]).weight
        expect = (before[r["layer"]] + deltas[r["layer"]] - w0).norm().item()
        assert abs(r["fro_norm"] - expect) <= 1e-5 * expect and len(r["singular_values"]) == layers[0][1].rank

    # the optimizer honours the declared roles: LoRA+'s K x lr on FAST tensors, no decay on NO_DECAY ones
    ratio = 4.0 if _fast_trains(run) else 1.0
    if ratio == 1.0:  # nothing LoRA+ could speed up: refused in one line
        with pytest.raises(UserError, match="--lora-plus-ratio 4 needs LoRA layers") as e:
            make_optimizer(run, _settings(variant, init, tiny, 4.0))
        assert "\n" not in str(e.value)
    settings = _settings(variant, init, tiny, ratio)
    optimizer = make_optimizer(run, settings)
    group = {p: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    expect = {p: (1e-2 * (ratio if n in m.FAST else 1.0), 0.0 if n in m.NO_DECAY else 0.1)
              for _, m in layers for n, p in m.named_parameters(recurse=False) if p.requires_grad}
    assert group == expect

    # --resume, through the checkpoint functions the loop uses: the next steps equal the unbroken run's, bit
    # for bit
    run.train()
    _step(run, optimizer, 1)
    last = os.path.join(tmp_path, "last")
    checkpoint.save(last, run, None, tiny, {"optimizer": copy.deepcopy(optimizer.state_dict()), "step": 1})
    state = checkpoint.load_state(last)
    resumed = build_model(settings, last, "fp32").train()
    optimizer2 = make_optimizer(resumed, settings)
    sharding.load_optimizer(resumed, optimizer2, state["optimizer"], last)
    for seed in (2, 3):
        _step(run, optimizer, seed)
        _step(resumed, optimizer2, seed)
    ours, theirs = run.state_dict(), resumed.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), [k for k in ours
                                                                if not torch.equal(ours[k], theirs[k])]


def check_export(base_model, tiny, tmp_path, variant, init):
    """peft loads the export on the original base with our merged logits, or the export is refused in one line
    and writes nothing."""
    from peft import PeftModel
    model = copy.deepcopy(base_model)
    torch.manual_seed(0)  # A's draw: the fp32 rounding against peft stays the same whatever ran before
    lora.inject(model, _settings(variant, init).lora_config())
    randomize_adapter(model)
    lora.save_adapter(model, tmp_path / "ad", base_model=tiny)
    try:
        lora.export_peft(tmp_path / "ad", tmp_path / "peft")
    except UserError as e:
        assert "\n" not in str(e) and str(e).startswith("export-peft: ") and not (tmp_path / "peft").exists()
        return
    lora.merge(model)
    via_peft = PeftModel.from_pretrained(copy.deepcopy(base_model), tmp_path / "peft").eval()
    assert _close(_logits(via_peft), _logits(model))


def docs_example(name):
    """The class `name` as its python block in docs/lora.md writes it, defined where layers.py's are."""
    with open(os.path.join(REPO, "docs", "lora.md")) as f:
        block = next(b for b in re.findall(r"```python\n(.*?)```", f.read(), re.S) if f"class {name}(" in b)
    namespace = dict(vars(layers))
    exec(block, namespace)
    return namespace[name]


@pytest.mark.peft
def test_docs_gated_example(tiny, base_model, tmp_path, monkeypatch):
    """docs/lora.md's gated LoRA, a variant with a tensor of its own that does not ship: its formula,
    y = W x + b + s B diag(g) A x, then the whole contract for every init it allows, export to peft
    included."""
    gated = docs_example("GatedLoRALinear")
    torch.manual_seed(0)
    layer = gated(torch.nn.Linear(32, 16), LoRAConfig(rank=4, alpha=8))
    with torch.no_grad():
        torch.nn.init.normal_(layer.lora_B, std=0.1)
        layer.lora_gate.copy_(torch.tensor([1.0, 0.0, 2.0, -0.5]))
    x, w, b = torch.randn(3, 32), layer.base.weight, layer.base.bias
    a, bb, g = layer.lora_A, layer.lora_B, layer.lora_gate
    assert (layer(x) - (x @ w.T + b + 2.0 * x @ a.T @ torch.diag(g) @ bb.T)).abs().max() <= 1e-6
    assert (layer.delta_weight() - 2.0 * bb @ torch.diag(g) @ a).abs().max() <= 1e-6

    monkeypatch.setitem(VARIANTS, "gated", gated)
    inits = [i for i in INITS if _allowed("gated", i)]
    assert inits == [i for i in INITS if _allowed("lora", i)]  # no refusal of its own: every init LoRA takes
    for init in inits:
        check_contract(tiny, base_model, tmp_path / init, "gated", init)
        check_export(base_model, tiny, tmp_path / f"{init}-peft", "gated", init)

import copy
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, randomize_adapter
from dialsum_raw import lora
from dialsum_raw.lora import INITS, DoRALinear, LoRAConfig, LoRALinear
from dialsum_raw.config import Settings
from dialsum_raw.errors import UserError
from dialsum_raw.modeling import count_parameters, load_model, parameter_report
from dialsum_raw.training import make_optimizer  # the loop's own optimizer (LoRA+ groups)


def _inputs(seed=0, batch=2, src=12, tgt=5):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(2, 32000, (batch, src), generator=g),
            "attention_mask": torch.ones(batch, src, dtype=torch.long),
            "decoder_input_ids": torch.randint(2, 32000, (batch, tgt), generator=g)}


def _seeded(f, seed=7):
    torch.manual_seed(seed)
    return f()


def test_small_standin_counts(small):
    model = load_model(small)
    assert count_parameters(model) == (76_961_152, 76_961_152)
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    names = lora.inject(model, LoRAConfig(("q", "v"), rank=8, alpha=16, dropout=0.05))
    assert len(names) == 48
    assert count_parameters(model) == (344_064, 77_305_216)
    assert parameter_report(model).splitlines() == [
        "trainable model parameters: 344,064", "all model parameters: 77,305,216",
        "percentage of trainable model parameters: 0.45%"]


def test_layer_init_and_scaling():
    base = torch.nn.Linear(32, 16)
    layer = LoRALinear(base, LoRAConfig(rank=4, alpha=8))
    assert layer.scaling == 2.0 and torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / 32 ** 0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 32
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > bound / 3
    assert LoRALinear(base, LoRAConfig(rank=4, alpha=8, rslora=True)).scaling == 4.0
    with pytest.raises(UserError):
        LoRAConfig(rank=0, alpha=8)
    with pytest.raises(UserError, match=f"init must be one of {', '.join(INITS)}"):
        LoRAConfig(rank=4, alpha=8, init="corda")


@pytest.mark.peft
@pytest.mark.parametrize("dora", [False, True])
def test_dropout_only_on_the_lora_input_as_peft(dora):
    """Non-zero B, dropout on, same seed: the formula (and peft's layer) put dropout on the adapter's input
    only; with DoRA, peft's rescaled base term also sees the dropped-out input."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    holder = torch.nn.Sequential()
    holder.add_module("q", torch.nn.Linear(32, 16))
    ours = lora.VARIANTS["dora" if dora else "lora"](holder.q, LoRAConfig(rank=4, alpha=8, dropout=0.5))
    torch.nn.init.normal_(ours.lora_B, std=0.1)
    theirs = get_peft_model(holder, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q"],
                                               use_dora=dora)).base_model.model.q
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora_A)
        theirs.lora_B["default"].weight.copy_(ours.lora_B)
    ours.train(); theirs.train()
    x = torch.randn(3, 32)
    y, y_peft = _seeded(lambda: ours(x)), _seeded(lambda: theirs(x))
    keep = _seeded(lambda: torch.nn.functional.dropout(torch.ones_like(x), 0.5))  # the layers' dropout draw
    assert (y - y_peft).abs().max() <= 1e-6
    w, b, s, xd = holder.q.weight, holder.q.bias, ours.scaling, x * keep
    if not dora:
        expect = x @ w.T + b + s * xd @ ours.lora_A.T @ ours.lora_B.T
    else:
        f = ours.lora_magnitude / (w + s * ours.lora_B @ ours.lora_A).norm(dim=1)
        expect = x @ w.T + b + (f - 1) * (xd @ w.T) + f * s * (xd @ ours.lora_A.T @ ours.lora_B.T)
    assert (y - expect).abs().max() <= 1e-6
    assert (y - (x @ w.T + b)).abs().max() > 1e-2  # the adapter does act


VARIANTS = {
    "plain": {},
    "rslora": {"rslora": True},
    "dora": {"variant": "dora"},
    "gaussian": {"init": "gaussian"},
    "pissa": {"init": "pissa"},
    "pissa+dora": {"init": "pissa", "variant": "dora"},
    "olora": {"init": "olora"},
    "olora+dora": {"init": "olora", "variant": "dora", "rslora": True},
    "mica": {"init": "mica"},
    "vera": {"variant": "vera", "vera_rank": 16},
}


def _cfg(variant="plain", targets=("q", "v"), rank=4, alpha=8):
    return LoRAConfig(targets, rank, alpha, **VARIANTS[variant])


@pytest.mark.parametrize("variant", ["plain", "dora", "pissa+dora", "vera"])
def test_merge_unmerge_idempotent(tiny, variant):
    model = load_model(tiny).eval()
    lora.inject(model, _cfg(variant, ("q", "v", "wo")))
    randomize_adapter(model)
    q = model.encoder.block[0].layer[0].SelfAttention.q
    base_q = q.base.weight.clone()
    x = _inputs()
    ref = model(**x).logits
    lora.merge(model); lora.merge(model)
    assert torch.allclose(model(**x).logits, ref, atol=1e-5)
    lora.unmerge(model); lora.unmerge(model)
    assert torch.allclose(model(**x).logits, ref, atol=1e-5)
    assert torch.allclose(q.base.weight, base_q, atol=1e-6)


def test_merge_in_bf16_matches_the_fp32_formula():
    """Expected values from the formula in fp32, rounded once: W + s B A, and DoRA's m (W + s B A) / ||W + s B
    A||."""
    torch.manual_seed(0)
    for dora in (False, True):
        base = torch.nn.Linear(64, 64).to(torch.bfloat16)
        w = base.weight.float().clone()
        layer = lora.VARIANTS["dora" if dora else "lora"](base, LoRAConfig(rank=4, alpha=8))
        torch.nn.init.normal_(layer.lora_B, std=1e-3)
        v = w + 2.0 * layer.lora_B.float() @ layer.lora_A.float()
        if dora:
            assert torch.equal(
                layer.lora_magnitude, w.norm(dim=1)
            )  # trained tensors stay fp32 on a bf16 base
            v = layer.lora_magnitude.float()[:, None] * v / v.norm(dim=1, keepdim=True)
        layer.merge()
        assert layer.base.weight.dtype == torch.bfloat16
        assert torch.equal(layer.base.weight, v.to(torch.bfloat16)), dora
        # the update is below bf16's resolution of W in most entries: a bf16 product would drop it
        assert not torch.equal(layer.base.weight, w.to(torch.bfloat16))


def test_dora_keeps_a_small_magnitude_change_under_bf16_autocast():
    """m raised by 0.3%: f = m / ||W + s B A|| is then within 0.3% of 1, where bf16 steps by 2^-8 and 2^-7, so
    a bf16 f would drop the change (-0.28% signed error before the fix). f and the DoRA terms stay fp32, as in
    peft."""
    torch.manual_seed(0)
    layer = DoRALinear(torch.nn.Linear(256, 256), LoRAConfig(rank=8, alpha=16))
    torch.nn.init.normal_(layer.lora_B, std=1e-3)
    with torch.no_grad():
        layer.lora_magnitude.mul_(1.003)
    x = torch.randn(64, 256)
    exact = layer(x)
    with torch.autocast("cpu", torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16  # the output stays in autocast's dtype, as the base layer's
    signed_error = ((y.float() - exact) * exact).sum() / (exact * exact).sum()  # along the exact output
    assert abs(signed_error) < 5e-4


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_delta_weight_is_fp32_under_autocast(variant):
    """Under autocast even B.float() @ A.float() runs in bf16; delta_weight() (and DoRA's norm from it) turns
    it off."""
    torch.manual_seed(0)
    layer = lora.VARIANTS[variant](torch.nn.Linear(64, 64), LoRAConfig(rank=4, alpha=8))
    torch.nn.init.normal_(layer.lora_B, std=0.1)
    exact = layer.delta_weight()
    with torch.autocast("cpu", torch.bfloat16):
        under = layer.delta_weight()
    assert under.dtype == torch.float32 and torch.equal(under, exact)


def test_merged_dora_moves_with_its_model_and_unmerges():
    """merged_norm is a non-persistent buffer: it follows .to() (meta here stands in for another device) and
    stays out of the state dict."""
    torch.manual_seed(0)
    layer = DoRALinear(torch.nn.Linear(32, 16), LoRAConfig(rank=4, alpha=8))
    torch.nn.init.normal_(layer.lora_B, std=0.1)
    original, keys = layer.base.weight.detach().clone(), layer.state_dict().keys()
    layer.merge()
    assert layer.state_dict().keys() == keys
    layer.to(torch.float64)
    layer.unmerge()
    assert (layer.base.weight - original).abs().max() < 1e-6
    layer.merge()
    layer.to("meta")
    layer.unmerge()
    assert layer.base.weight.device.type == "meta" and not layer.merged


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"variant": "vera", "init": "pissa"}, "VeRA takes no --lora-init"),
        ({"variant": "vera", "rslora": True}, "VeRA has no alpha/r scale"),
        ({"variant": "dora", "init": "mica"}, "DoRA does not combine with --lora-init mica"),
        (
            {"variant": "lora-fa", "init": "mica"},
            "--lora-variant lora-fa with --lora-init mica trains nothing",
        ),
    ],
)
def test_combinations_peft_refuses_are_refused_in_one_line(fields, message):
    with pytest.raises(UserError, match=message) as e:
        LoRAConfig(**fields)
    assert "\n" not in str(e.value)
    from dialsum_raw.config import validate  # the same line at the command line
    with pytest.raises(UserError, match=message):
        validate(Settings(lora_variant=fields["variant"], lora_init=fields.get("init", "kaiming"),
                          rslora=fields.get("rslora", False)))


def test_vera_projections_are_shared_and_follow_the_model(tiny):
    model = load_model(tiny)
    lora.inject(model, LoRAConfig(("q", "wo"), variant="vera"))
    shared = {id(m.shared) for _, m in lora.lora_layers(model)}
    assert len(shared) == 1 and not any("vera_A" in k for k in model.state_dict())
    model.to(torch.float64)
    assert {m.shared.vera_A.dtype for _, m in lora.lora_layers(model)} == {torch.float64}
    assert lora.lora_layers(model)[0][1].shared.vera_A.shape == (256, 128)  # r x the widest input (wo: d_ff)


def test_targets_and_errors(tiny):
    model = load_model(tiny)
    names = lora.inject(model, LoRAConfig(("q", "k", "v", "o", "wi_0", "wi_1", "wo"), rank=2, alpha=4))
    assert len(names) == 2 * 4 + 2 * 4 + 2 * 4 + 3 * 4  # enc self, dec self, dec cross (x4 each) + ff (x3)
    with pytest.raises(UserError, match="'wi' matches no Linear"):
        lora.inject(load_model(tiny), LoRAConfig(("q", "wi"), rank=2, alpha=4))  # flan-t5 is gated: wi_0/wi_1


def test_adapter_only_state_and_reload(tiny, tmp_path):
    model = load_model(tiny)
    lora.inject(model, _cfg())
    randomize_adapter(model)
    lora.save_adapter(model, tmp_path / "ad", base_model="tiny")
    cfg = json.loads((tmp_path / "ad" / "adapter.json").read_text())
    assert cfg == {
        "format": "dialsum_raw-lora/3",
        "base_model": "tiny",
        "targets": ["q", "v"],
        "rank": 4,
        "alpha": 8,
        "dropout": 0.0,
        "rslora": False,
        "variant": "lora",
        "init": "kaiming",
        "vera_rank": 256,
        "base_dtype": "fp32",
        "loftq_iter": 1,
    }
    from safetensors.torch import load_file
    keys = load_file(tmp_path / "ad" / "adapter.safetensors").keys()
    assert len(keys) == 2 * 12 and all(k.endswith((".lora_A", ".lora_B")) for k in keys)
    fresh = load_model(tiny).eval()
    lora.load_adapter(fresh, tmp_path / "ad")
    x = _inputs()
    assert torch.equal(fresh(**x).logits, model.eval()(**x).logits)


def test_adapter_that_does_not_fit_is_a_clear_error(tiny, small, tmp_path):
    model = load_model(tiny)
    lora.inject(model, _cfg())
    lora.save_adapter(model, tmp_path / "ad", base_model="tiny")
    with pytest.raises(
        UserError,
        match=r"does not fit this base model \(base has layer decoder\.block\.2\.\S+ that the adapter lacks",
    ):
        lora.load_adapter(load_model(small), tmp_path / "ad")
    cfg = tmp_path / "ad" / "adapter.json"
    cfg.write_text(cfg.read_text().replace('"rank": 4', '"rank": 8'))  # rank differs from the tensors
    with pytest.raises(
        UserError,
        match=r"does not fit this base model: \S+lora_A has shape \(4, 64\), the base needs \(8, 64\)",
    ):
        lora.load_adapter(load_model(tiny), tmp_path / "ad")
    cfg.write_text(cfg.read_text().replace('"rank": 8', '"rank": 4').replace('"v"', '"k"'))
    with pytest.raises(
        UserError, match=r"adapter has \S+SelfAttention\.q\.lora_A|base has layer \S+\.k\.lora_A"
    ):
        lora.load_adapter(load_model(tiny), tmp_path / "ad")
    cfg.write_text(cfg.read_text().replace('"k"', '"v"'))
    w = tmp_path / "ad" / "adapter.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated or corrupted"):
        lora.load_adapter(load_model(tiny), tmp_path / "ad")
    with pytest.raises(UserError, match="not an adapter folder"):
        lora.load_adapter(load_model(tiny), tmp_path)


PEFT_CONFIG = {"plain": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True},
               "gaussian": {"init_lora_weights": "gaussian"}, "pissa": {"init_lora_weights": "pissa"},
               "pissa+dora": {"init_lora_weights": "pissa", "use_dora": True},
               "olora": {"init_lora_weights": "olora"},
               "olora+dora": {"init_lora_weights": "olora", "use_dora": True, "use_rslora": True},
               "mica": {"init_lora_weights": "mica"}, "vera": {"r": 16}}
DETERMINISTIC = ("pissa", "pissa+dora", "olora", "olora+dora", "mica", "vera")  # SVD, QR, seeded: not copied
TWIN = {
    "base.weight": lambda t: t.base_layer.weight,
    "lora_A": lambda t: t.lora_A["default"].weight,
    "lora_B": lambda t: t.lora_B["default"].weight,
    "lora_magnitude": lambda t: t.lora_magnitude_vector["default"].weight,
    "vera_lambda_b": lambda t: t.vera_lambda_b["default"],
    "vera_lambda_d": lambda t: t.vera_lambda_d["default"],
    "shared.vera_A": lambda t: t.vera_A["default"],
    "shared.vera_B": lambda t: t.vera_B["default"],
}  # ours: peft's


def _twin_layers(ours, theirs):
    named = dict(theirs.named_modules())
    return [(m, named[f"base_model.model.{name}"]) for name, m in lora.lora_layers(ours)]


def _peft_twin(tiny, variant, rank=4, alpha=8, targets=("q", "v")):
    """peft's LoRA (or VeRA) with the matching config on the same base (the oracle)."""
    from peft import LoraConfig, VeraConfig, get_peft_model
    if variant == "vera":
        config = VeraConfig(
            target_modules=list(targets), vera_dropout=0.0, task_type="SEQ_2_SEQ_LM", **PEFT_CONFIG[variant]
        )
    else:
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                            task_type="SEQ_2_SEQ_LM", **PEFT_CONFIG[variant])
    return get_peft_model(load_model(tiny, dropout=0.0), config)


def _tensors(m):
    """A layer's parameters and the shared buffers (VeRA's projections)."""
    return [*m.named_parameters(), *((n, b) for n, b in m.named_buffers() if n.startswith("shared."))]


def _max_diff(ours, theirs):
    """Largest difference of every tensor of our layers (A, B, m, λ, projections, the base weight) from
    peft's."""
    return max(
        (p - TWIN[n](twin)).abs().max().item()
        for m, twin in _twin_layers(ours, theirs)
        for n, p in _tensors(m)
    )


def _copy_to_twin(ours, theirs):
    with torch.no_grad():
        for m, twin in _twin_layers(ours, theirs):
            for n, p in m.named_parameters():
                TWIN[n](twin).copy_(p)


def _trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.peft
@pytest.mark.parametrize("variant,ratio,decay", [(v, 1.0, 0.0) for v in VARIANTS] + [
    ("plain", 16.0, 0.1), ("dora", 16.0, 0.0)])  # the last two: LoRA+ against create_loraplus_optimizer
def test_equivalent_to_peft_logits_and_one_adamw_step(tiny, variant, ratio, decay):
    from peft.optimizers import create_loraplus_optimizer
    torch.manual_seed(0)
    ours = load_model(tiny, dropout=0.0)  # dropout off everywhere, so both are deterministic
    base_before = {k: v.clone() for k, v in ours.state_dict().items()}
    lora.inject(ours, _cfg(variant))
    theirs = _peft_twin(tiny, variant)
    assert _trainable(ours) == _trainable(theirs)  # MiCA: B frozen in both; VeRA: λ_b and λ_d only
    assert parameter_report(ours).splitlines()[0] == f"trainable model parameters: {_trainable(theirs):,}"
    x = _inputs()
    # after injection: PiSSA's and OLoRA's A, B and residual W, MiCA's B, DoRA's m, VeRA's projections and λ
    # are
    # peft's own (no copying)
    diffs = {"logits after injection": (ours(**x).logits - theirs(**x).logits).abs().max().item()}
    if variant in DETERMINISTIC:
        diffs["tensors after injection"] = _max_diff(ours, theirs)
    if variant not in ("pissa", "pissa+dora", "olora", "olora+dora"):  # random starts differ by RNG use (and
        randomize_adapter(
            ours
        )  # MiCA's A, VeRA's λ_b start at 0): give both the same non-zero A and B (λ_b, λ_d)
        _copy_to_twin(ours, theirs)
    ours.train(); theirs.train()
    x["labels"] = x.pop("decoder_input_ids")
    a, b = ours(**x), theirs(**x)
    diffs["logits before the step"] = (a.logits - b.logits).abs().max().item()
    settings = Settings(lr=1e-2, weight_decay=decay, lora_plus_ratio=ratio)
    opt_a = make_optimizer(ours, settings)
    opt_b = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-2, loraplus_lr_ratio=ratio,
                                      loraplus_weight_decay=decay)
    a.loss.backward(); b.loss.backward()
    opt_a.step(); opt_b.step()
    diffs["parameters after one AdamW step"] = _max_diff(ours, theirs)
    print(f"peft oracle, {variant} (LoRA+ {ratio:g}): " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    assert max(v for k, v in diffs.items() if k.startswith("logits")) <= 1e-5
    assert max(v for k, v in diffs.items() if not k.startswith("logits")) <= 1e-6
    residual = INITS[_cfg(variant).init].residual
    for key, value in ours.state_dict().items():
        if "lora_" not in key and "vera_" not in key and not residual:
            assert torch.equal(value, base_before[key.replace(".base.", ".")]), (
                key
            )  # frozen base: bit-identical


@pytest.mark.peft
def test_gaussian_init_draws_as_peft():
    from peft import LoraConfig, get_peft_model
    holder = torch.nn.Sequential()
    holder.add_module("q", torch.nn.Linear(32, 16))
    twin = get_peft_model(holder, LoraConfig(r=4, lora_alpha=8, target_modules=["q"])).base_model.model.q
    ours = _seeded(lambda: LoRALinear(holder.q.base_layer, LoRAConfig(rank=4, alpha=8, init="gaussian")))
    _seeded(lambda: twin.reset_lora_parameters("default", "gaussian"))
    assert torch.equal(ours.lora_A, twin.lora_A["default"].weight) and torch.count_nonzero(ours.lora_B) == 0
    assert abs(ours.lora_A.std().item() - 1 / 4) < 0.05  # std 1/r, as peft (not variance 1/r)


@pytest.mark.peft
@pytest.mark.parametrize(
    "variant", ["rslora", "dora", "pissa", "pissa+dora", "olora", "olora+dora", "mica", "vera"]
)
def test_export_peft_loads_in_peft_with_our_merged_logits(tiny, tmp_path, variant):
    from peft import PeftModel
    model = load_model(tiny).eval()
    lora.inject(model, _cfg(variant))
    randomize_adapter(model)
    lora.save_adapter(model, tmp_path / "ad", base_model=tiny)
    lora.export_peft(tmp_path / "ad", tmp_path / "peft")
    lora.merge(model)
    x = _inputs()
    via_peft = PeftModel.from_pretrained(load_model(tiny), tmp_path / "peft").eval()  # on the ORIGINAL base
    diff = (via_peft(**x).logits - model(**x).logits).abs().max().item()
    print(f"peft oracle, {variant}: export-peft on the original base vs our merged model {diff:.1e}")
    assert diff <= 1e-5
    assert getattr(via_peft.peft_config["default"], "use_dora", False) == ("dora" in variant)


@pytest.mark.slow
@pytest.mark.peft
def test_merge_and_export_peft_commands(tiny, tmp_path):
    from peft import PeftModel
    model = load_model(tiny).eval()
    lora.inject(model, _cfg())
    randomize_adapter(model)
    lora.save_adapter(model, tmp_path / "ad", base_model=tiny)
    x = _inputs()
    expect = model(**x).logits
    for cmd in (
        ["merge", "--base", tiny, "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "merged")],
        ["export-peft", "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "peft")],
    ):
        subprocess.run(
            [sys.executable, "-m", "dialsum_raw.lora", *cmd], check=True, cwd=REPO, capture_output=True
        )
    from transformers import AutoModelForSeq2SeqLM
    merged = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged").eval()
    assert (merged(**x).logits - expect).abs().max() <= 1e-5
    via_peft = PeftModel.from_pretrained(load_model(tiny), tmp_path / "peft").eval()
    assert (via_peft(**x).logits - expect).abs().max() <= 1e-5


def _step(model, optimizer, seed):
    x = _inputs(seed)
    x.pop("decoder_input_ids")
    labels = torch.randint(2, 32000, (2, 5), generator=torch.Generator().manual_seed(seed))
    model(**x, labels=labels).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("variant", ["gaussian", "pissa+dora", "olora", "mica", "vera"])
def test_resume_from_saved_adapter_continues_identically(tiny, tmp_path, variant):
    """The loop resumes with load_adapter on a fresh base: PiSSA and OLoRA come back in their trained rank-r
    form on the residual base, MiCA with B frozen, so the next steps equal those of the run that never
    stopped, bit for bit."""
    settings = Settings(
        lr=1e-2, weight_decay=0.1, lora_plus_ratio=1.0 if variant in ("mica", "vera") else 4.0
    )  # no B
    torch.manual_seed(0)
    run = load_model(tiny, dropout=0.0).train()
    lora.inject(run, _cfg(variant))
    opt = make_optimizer(run, settings)
    _step(run, opt, 1)
    lora.save_adapter(run, tmp_path / "ad", base_model=tiny)
    saved = copy.deepcopy(opt.state_dict())  # as checkpoint.save writes it: not aliased to the live state
    resumed = load_model(tiny, dropout=0.0).train()
    lora.load_adapter(resumed, tmp_path / "ad")
    opt2 = make_optimizer(resumed, settings)
    opt2.load_state_dict(saved)
    for seed in (2, 3):
        _step(run, opt, seed)
        _step(resumed, opt2, seed)
    state, state2 = run.state_dict(), resumed.state_dict()
    assert state.keys() == state2.keys()
    for key in state:
        assert torch.equal(state[key], state2[key]), key


def test_adapter_json_is_the_config_and_pissa_applies_to_the_original_base(tiny, tmp_path):
    model = load_model(tiny).eval()
    config = LoRAConfig(("q", "v"), 4, 8, rslora=True, variant="dora", init="pissa")
    lora.inject(model, config)
    randomize_adapter(model)
    lora.save_adapter(model, tmp_path / "ad", base_model="tiny")
    saved = json.loads((tmp_path / "ad" / "adapter.json").read_text())
    assert saved == {
        "format": "dialsum_raw-lora/3",
        "base_model": "tiny",
        "targets": ["q", "v"],
        "rank": 4,
        "alpha": 8,
        "dropout": 0.0,
        "rslora": True,
        "variant": "dora",
        "init": "pissa",
        "vera_rank": 256,
        "base_dtype": "fp32",
        "loftq_iter": 1,
    }
    assert LoRAConfig.from_json(saved) == config
    from safetensors.torch import load_file
    t = load_file(tmp_path / "ad" / "adapter.safetensors")
    name, m = lora.lora_layers(model)[0]
    assert torch.equal(t[f"{name}.lora_A"], torch.cat([m.lora_A, m.lora_A0]))
    assert torch.equal(t[f"{name}.lora_B"], torch.cat([m.lora_B, -m.lora_B0], dim=1))
    # as a plain rank-2r LoRA on the original W (what peft sees), with alpha x sqrt 2 (rsLoRA), the trained
    # weights
    assert lora.layer_class(config).saved_rank_alpha(config) == (8, 8 * 2 ** 0.5)
    w = load_model(tiny).get_submodule(name).weight
    v = w + 8 * 2 ** 0.5 / 8 ** 0.5 * t[f"{name}.lora_B"] @ t[f"{name}.lora_A"]
    m.merge()
    assert (
        m.base.weight - t[f"{name}.lora_magnitude"][:, None] * v / v.norm(dim=1, keepdim=True)
    ).abs().max() < 1e-6


OLD_ADAPTERS = {  # adapter.json as the code before LoRAConfig wrote it (format 1), and before it had variants
    "pissa+dora": {
        "format": "dialsum_raw-lora/1",
        "rank": 8,
        "alpha": 16,
        "dropout": 0.0,
        "targets": ["q", "v"],
        "rslora": False,
        "dora": True,
        "init": "pissa",
        "base_model": "tiny",
        "pissa": {"rank": 4, "alpha": 8, "conversion": "saved as a plain LoRA on the original base: ..."},
    },
    "rslora": {
        "format": "dialsum_raw-lora/1",
        "rank": 4,
        "alpha": 8,
        "dropout": 0.0,
        "targets": ["q", "v"],
        "rslora": True,
        "base_model": "tiny",
    },
}


@pytest.mark.parametrize("variant", list(OLD_ADAPTERS))
def test_old_adapters_load(tiny, tmp_path, variant):
    """Format 1 saved the same tensors (PiSSA in its rank-2r form); its adapter.json is written out by hand
    here."""
    model = load_model(tiny).eval()
    lora.inject(model, _cfg(variant))
    randomize_adapter(model)
    lora.save_adapter(model, tmp_path / "ad", base_model="tiny")
    (tmp_path / "ad" / "adapter.json").write_text(json.dumps(OLD_ADAPTERS[variant]))
    fresh = load_model(tiny).eval()
    assert lora.load_adapter(fresh, tmp_path / "ad") == _cfg(variant)
    x = _inputs()
    assert (fresh(**x).logits - model(**x).logits).abs().max() <= 1e-6


@pytest.mark.parametrize(
    "change,message",
    [
        ({"format": "dialsum_raw-lora/9"}, "adapter format 'dialsum_raw-lora/9' is not"),
        ({"targets": "qv"}, "adapter targets must be a list, got 'qv'"),
    ],
)
def test_an_adapter_config_from_elsewhere_is_refused_naming_the_file(tiny, tmp_path, change, message):
    model = load_model(tiny).eval()
    lora.inject(model, _cfg("rslora"))
    lora.save_adapter(model, tmp_path / "ad", base_model="tiny")
    path = tmp_path / "ad" / "adapter.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(UserError, match=f"{path}: {message}"):
        lora.load_adapter(load_model(tiny), tmp_path / "ad")


def test_make_optimizer_groups():
    model = torch.nn.ModuleDict({"attn": torch.nn.ModuleDict({"q": torch.nn.Linear(8, 8)}),
                                 "norm": torch.nn.LayerNorm(8)})
    groups = make_optimizer(model, Settings(lr=1e-3, weight_decay=0.1)).param_groups
    assert [(len(g["params"]), g["lr"], g["weight_decay"]) for g in groups] == [
        (1, 1e-3, 0.1),
        (3, 1e-3, 0.0),
    ]
    with pytest.raises(UserError, match="--lora-plus-ratio 4 needs LoRA layers"):
        make_optimizer(model, Settings(lora_plus_ratio=4.0))
    lora.inject(model, LoRAConfig(("q",), rank=2, alpha=4, variant="dora"))
    model["norm"].requires_grad_(True)
    groups = make_optimizer(model, Settings(lr=1e-3, weight_decay=0.1, lora_plus_ratio=4.0)).param_groups
    # A decays at lr; B decays at 4 lr; DoRA's magnitude and the norm's tensors: 4 lr, no decay
    assert [(len(g["params"]), g["lr"], g["weight_decay"]) for g in groups] == [
        (1, 1e-3, 0.1), (1, 4e-3, 0.1), (3, 4e-3, 0.0)]


def test_lora_fa_steps_b_as_plain_lora_and_keeps_a(tiny):
    """LoRA-FA has no peft twin (peft's LoraFAOptimizer steps B differently): its formula is the oracle. With
    A frozen, one AdamW step leaves A at its start and moves B exactly as plain LoRA's step does (B's gradient
    does not depend on A training); merge, save, load and export are the contract test's
    (tests/test_contract.py)."""
    x = _inputs()
    x["labels"] = x.pop("decoder_input_ids")
    models = {}
    for variant in ("lora", "lora-fa"):
        torch.manual_seed(0)
        model = models[variant] = load_model(tiny, dropout=0.0).train()
        lora.inject(model, LoRAConfig(("q", "v"), 4, 8, variant=variant))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # the same A (seeded) and B in both: B starts at 0
            for _, m in lora.lora_layers(model):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
        start = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        opt = make_optimizer(model, Settings(lr=1e-2))
        model(**x).loss.backward()
        opt.step()
    fa, plain = dict(models["lora-fa"].named_parameters()), dict(models["lora"].named_parameters())
    for n in start:
        if n.endswith("lora_A"):
            assert torch.equal(fa[n], start[n]) and not torch.equal(plain[n], start[n])
        else:
            assert torch.equal(fa[n], plain[n]) and not torch.equal(fa[n], start[n])
    assert (
        _trainable(models["lora-fa"]) == _trainable(models["lora"]) // 2
    )  # q, v square: A and B the same size

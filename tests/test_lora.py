import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from dialsum_raw import lora
from dialsum_raw.errors import UserError
from dialsum_raw.modeling import count_parameters, load_model, parameter_report


def _inputs(seed=0, batch=2, src=12, tgt=5):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(2, 32000, (batch, src), generator=g),
            "attention_mask": torch.ones(batch, src, dtype=torch.long),
            "decoder_input_ids": torch.randint(2, 32000, (batch, tgt), generator=g)}


def _randomize(model, seed=1):
    """Non-zero B so the adapter actually changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora.lora_layers(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def test_small_standin_counts(small):
    model = load_model(small)
    assert count_parameters(model) == (76_961_152, 76_961_152)
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    names = lora.inject(model, ("q", "v"), rank=8, alpha=16, dropout=0.05)
    assert len(names) == 48
    assert count_parameters(model) == (344_064, 77_305_216)
    assert parameter_report(model).splitlines() == [
        "trainable model parameters: 344,064", "all model parameters: 77,305,216",
        "percentage of trainable model parameters: 0.45%"]


def test_layer_init_scaling_and_dropout_only_on_a():
    base = torch.nn.Linear(32, 16)
    layer = lora.LoRALinear(base, rank=4, alpha=8, dropout=0.5)
    assert layer.scaling == 2.0 and torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / 32 ** 0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 32
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > bound / 3
    assert lora.LoRALinear(base, rank=4, alpha=8, rslora=True).scaling == 4.0
    x = torch.randn(3, 32)
    layer.train()
    assert torch.equal(layer(x), base(x))  # B = 0: dropout touches only the LoRA path
    with pytest.raises(UserError):
        lora.LoRALinear(base, rank=0, alpha=8)


def test_merge_unmerge_idempotent(tiny):
    model = load_model(tiny).eval()
    base_q = model.encoder.block[0].layer[0].SelfAttention.q.weight.clone()
    lora.inject(model, ("q", "v", "wo"), rank=4, alpha=8)
    _randomize(model)
    x = _inputs()
    ref = model(**x).logits
    lora.merge(model); lora.merge(model)
    assert torch.allclose(model(**x).logits, ref, atol=1e-5)
    lora.unmerge(model); lora.unmerge(model)
    assert torch.allclose(model(**x).logits, ref, atol=1e-5)
    assert torch.allclose(model.encoder.block[0].layer[0].SelfAttention.q.base.weight, base_q, atol=1e-6)


def test_merge_in_bf16_uses_fp32_product():
    base = torch.nn.Linear(64, 64).to(torch.bfloat16)
    layer = lora.LoRALinear(base, rank=4, alpha=8).to(torch.bfloat16)
    torch.nn.init.normal_(layer.lora_B, std=1e-3)
    expect = (base.weight.float() + layer.delta_weight()).to(torch.bfloat16)
    layer.merge()
    assert torch.equal(layer.base.weight, expect)


def test_targets_and_errors(tiny):
    model = load_model(tiny)
    names = lora.inject(model, ("q", "k", "v", "o", "wi_0", "wi_1", "wo"), rank=2, alpha=4)
    assert len(names) == 2 * 4 + 2 * 4 + 2 * 4 + 3 * 4  # enc self, dec self, dec cross (x4 each) + ff (x3)
    with pytest.raises(UserError, match="'wi' matches no Linear"):
        lora.inject(load_model(tiny), ("q", "wi"), rank=2, alpha=4)  # flan-t5 is gated: wi_0/wi_1


def test_adapter_only_state_and_reload(tiny, tmp_path):
    model = load_model(tiny)
    lora.inject(model, ("q", "v"), rank=4, alpha=8)
    _randomize(model)
    lora.save_adapter(model, tmp_path / "ad", base_model="tiny")
    cfg = json.loads((tmp_path / "ad" / "adapter.json").read_text())
    assert cfg == {"format": "dialsum_raw-lora/1", "rank": 4, "alpha": 8, "dropout": 0.0, "targets": ["q", "v"],
                   "rslora": False, "base_model": "tiny"}
    from safetensors.torch import load_file
    keys = load_file(tmp_path / "ad" / "adapter.safetensors").keys()
    assert len(keys) == 2 * 12 and all(k.endswith((".lora_A", ".lora_B")) for k in keys)
    fresh = load_model(tiny).eval()
    lora.load_adapter(fresh, tmp_path / "ad")
    x = _inputs()
    assert torch.equal(fresh(**x).logits, model.eval()(**x).logits)


def test_adapter_that_does_not_fit_is_a_clear_error(tiny, small, tmp_path):
    model = load_model(tiny)
    lora.inject(model, ("q", "v"), rank=4, alpha=8)
    lora.save_adapter(model, tmp_path / "ad", base_model="tiny")
    with pytest.raises(UserError, match=r"does not fit this base model \(base has layer decoder\.block\.2\.\S+ that the adapter lacks"):
        lora.load_adapter(load_model(small), tmp_path / "ad")
    cfg = tmp_path / "ad" / "adapter.json"
    cfg.write_text(cfg.read_text().replace('"rank": 4', '"rank": 8'))  # rank differs from the tensors
    with pytest.raises(UserError, match=r"does not fit this base model: \S+lora_A has shape \(4, 64\), the base needs \(8, 64\)"):
        lora.load_adapter(load_model(tiny), tmp_path / "ad")
    cfg.write_text(cfg.read_text().replace('"rank": 8', '"rank": 4').replace('"v"', '"k"'))
    with pytest.raises(UserError, match=r"adapter has \S+SelfAttention\.q\.lora_A|base has layer \S+\.k\.lora_A"):
        lora.load_adapter(load_model(tiny), tmp_path / "ad")
    cfg.write_text(cfg.read_text().replace('"k"', '"v"'))
    w = tmp_path / "ad" / "adapter.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated or corrupted"):
        lora.load_adapter(load_model(tiny), tmp_path / "ad")
    with pytest.raises(UserError, match="not an adapter folder"):
        lora.load_adapter(load_model(tiny), tmp_path)


def _peft_twin(tiny, ours, targets, rank, alpha):
    """peft's LoRA on the same base, with our A and B copied in (the oracle)."""
    from peft import LoraConfig, get_peft_model
    peft_model = get_peft_model(load_model(tiny, dropout=0.0), LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                                                               lora_dropout=0.0, task_type="SEQ_2_SEQ_LM"))
    named = dict(peft_model.named_modules())
    with torch.no_grad():
        for name, m in lora.lora_layers(ours):
            twin = named[f"base_model.model.{name}"]
            twin.lora_A["default"].weight.copy_(m.lora_A)
            twin.lora_B["default"].weight.copy_(m.lora_B)
    return peft_model


def test_equivalent_to_peft_logits_and_one_adamw_step(tiny):
    torch.manual_seed(0)
    ours = load_model(tiny, dropout=0.0)  # dropout off everywhere, so both are deterministic
    base_before = {k: v.clone() for k, v in ours.state_dict().items()}
    lora.inject(ours, ("q", "v"), rank=4, alpha=8)
    _randomize(ours)
    theirs = _peft_twin(tiny, ours, ("q", "v"), 4, 8)
    ours.train(); theirs.train()
    x = _inputs()
    labels = torch.randint(2, 32000, (2, 5), generator=torch.Generator().manual_seed(5))
    x.pop("decoder_input_ids")
    a, b = ours(**x, labels=labels), theirs(**x, labels=labels)
    assert (a.logits - b.logits).abs().max() <= 1e-5
    opt_a = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    opt_b = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    a.loss.backward(); b.loss.backward()
    opt_a.step(); opt_b.step()
    named = dict(theirs.named_modules())
    for name, m in lora.lora_layers(ours):
        twin = named[f"base_model.model.{name}"]
        assert (m.lora_A - twin.lora_A["default"].weight).abs().max() <= 1e-6
        assert (m.lora_B - twin.lora_B["default"].weight).abs().max() <= 1e-6
        assert not torch.equal(m.lora_A, m.lora_A.detach() * 0)  # trained, not zeroed
    for key, value in ours.state_dict().items():
        base_key = key.replace(".base.", ".")
        if "lora_" not in key:
            assert torch.equal(value, base_before[base_key]), key  # frozen base: bit-identical


def test_merge_and_export_peft_commands(tiny, tmp_path):
    from peft import PeftModel
    model = load_model(tiny).eval()
    lora.inject(model, ("q", "v"), rank=4, alpha=8)
    _randomize(model)
    lora.save_adapter(model, tmp_path / "ad", base_model=tiny)
    x = _inputs()
    expect = model(**x).logits
    for cmd in (["merge", "--base", tiny, "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "merged")],
                ["export-peft", "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "peft")]):
        subprocess.run([sys.executable, "-m", "dialsum_raw.lora", *cmd], check=True, cwd=REPO, capture_output=True)
    from transformers import AutoModelForSeq2SeqLM
    merged = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged").eval()
    assert (merged(**x).logits - expect).abs().max() <= 1e-4
    via_peft = PeftModel.from_pretrained(load_model(tiny), tmp_path / "peft").eval()
    assert (via_peft(**x).logits - expect).abs().max() <= 1e-4


def test_rslora_is_recorded_and_reloaded(tiny, tmp_path):
    model = load_model(tiny)
    lora.inject(model, ("q",), rank=4, alpha=8, rslora=True)
    lora.save_adapter(model, tmp_path / "ad", base_model="tiny")
    fresh = load_model(tiny)
    assert lora.load_adapter(fresh, tmp_path / "ad")["rslora"] is True
    assert {m.scaling for _, m in lora.lora_layers(fresh)} == {4.0}

"""--base-dtype: a base stored in nf4 or bf16, loaded tensor by tensor, and LoRA on it (QLoRA)."""

import os
import weakref

import pytest
import torch

from dialsum_raw.config import Settings, validate
from dialsum_raw.errors import UserError
from dialsum_raw.modeling import check_base_precision, load_model, quantized_names
from dialsum_raw.quant import NF4Linear, quantize, quantized_linears


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 1000, (2, 12), generator=g),
            "decoder_input_ids": torch.randint(0, 1000, (2, 5), generator=g)}


def test_nf4_model_is_the_fp32_model_with_its_block_weights_quantized(tiny):
    fp32, nf4 = load_model(tiny), load_model(tiny, base_dtype="nf4")
    names = quantized_names(fp32)
    assert {n for n, _ in quantized_linears(nf4)} == names
    assert {n.rsplit(".", 1)[-1] for n in names} == {"q", "k", "v", "o", "wi_0", "wi_1", "wo"}
    dense = dict(nf4.named_parameters())  # embeddings, lm_head, norms, position bias: fp32, the same values
    assert dense.keys() == {n for n, _ in fp32.named_parameters() if n.rsplit(".", 1)[0] not in names}
    assert all(p.dtype == torch.float32 and torch.equal(p, fp32.get_parameter(n)) for n, p in dense.items())
    assert (nf4.lm_head.weight is nf4.shared.weight) == (fp32.lm_head.weight is fp32.shared.weight)
    assert nf4.encoder.embed_tokens.weight is nf4.shared.weight
    assert not nf4.training
    with torch.no_grad():
        for n in names:
            fp32.get_submodule(n).weight.copy_(quantize(fp32.get_submodule(n).weight).dequantize())
        assert torch.equal(nf4(**batch()).logits, fp32(**batch()).logits)


def test_nf4_loading_is_deterministic_bit_for_bit(tiny):
    a, b = (dict(quantized_linears(load_model(tiny, base_dtype="nf4"))) for _ in range(2))
    assert all(torch.equal(x, y) for n in a for x, y in zip(a[n].buffers(), b[n].buffers()))


def test_bf16_base_stores_every_weight_in_bf16(tiny):
    model = load_model(tiny, base_dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_refusals_in_one_line(tiny, tmp_path):
    with pytest.raises(UserError, match="--lora-rank 0"):
        validate(Settings(lora_rank=0, base_dtype="nf4"))
    with pytest.raises(UserError, match="--fsdp"):
        validate(Settings(fsdp=True, base_dtype="nf4"))
    with pytest.raises(UserError, match="--base-dtype must be one of"):
        validate(Settings(base_dtype="int4"))
    with pytest.raises(UserError, match="needs bf16 compute"):
        check_base_precision("bf16", "fp32")
    check_base_precision("nf4", "fp32")  # dequantizes to fp32
    folder = tmp_path / "bin"
    folder.mkdir()
    for name in os.listdir(tiny):
        if name != "model.safetensors":
            (folder / name).write_bytes((open(os.path.join(tiny, name), "rb")).read())
    with pytest.raises(UserError, match="reads safetensors weights"):
        load_model(str(folder), base_dtype="nf4")


def test_nf4_loading_never_holds_more_than_two_fp32_block_weights(tiny, monkeypatch):
    """Each block weight is read, quantized and dropped: when a tensor is read, no block weight read before the
    previous one is still alive (the loop variable holds the previous one until the next arrives)."""
    from dialsum_raw import modeling
    read, seen, targets = modeling.read_safetensors, [], quantized_names(load_model(tiny))

    def watched(paths):
        for key, tensor in read(paths):
            alive = [k for k, ref in seen[:-1] if ref() is not None]
            assert not alive, f"{alive[0]} still held when {key} is read"
            if key.rsplit(".", 1)[0] in targets:
                seen.append((key, weakref.ref(tensor)))
            yield key, tensor
            del tensor

    monkeypatch.setattr(modeling, "read_safetensors", watched)
    model = load_model(tiny, base_dtype="nf4")
    assert len(seen) == len(quantized_linears(model)) > 2

"""quant.py against bitsandbytes 0.50.2 on CPU: the same 4-bit and 8-bit codes, the same weights, and
NF4Linear's forward and backward against a dense layer of the dequantized weight."""

import functools

import bitsandbytes.functional as bnb  # the [test] extra: an oracle, never skipped
import pytest
import torch
from torch.nn import functional as F

from dialsum_raw import quant


def bnb_quantize(w):
    return bnb.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")


@functools.lru_cache(1)
def weights():
    """Weights of the shapes T5 uses (attention 512x512, feed-forward 1024x2816 and 2816x1024, the tiny
    stand-in's 64x128), normal and heavy-tailed (Student t with 2 and 1.5 degrees of freedom: outliers that
    dominate their blocks)."""
    g = torch.Generator().manual_seed(0)
    t = torch.distributions.StudentT
    torch.manual_seed(0)
    return {"512x512 normal": torch.randn(512, 512, generator=g) * 0.05,
            "1024x2816 normal": torch.randn(1024, 2816, generator=g),
            "2816x1024 t(2)": t(2.0).sample((2816, 1024)),
            "64x128 t(1.5)": t(1.5).sample((64, 128))}


@pytest.mark.parametrize("name", list(weights()))
def test_codes_and_weights_equal_bitsandbytes(name):
    w = weights()[name]
    packed, state = bnb_quantize(w)
    ours = quant.quantize(w)
    assert torch.equal(ours.codes, packed.flatten()), "4-bit codes"
    assert torch.equal(ours.offset, state.offset), "absmax mean"
    assert torch.equal(ours.absmax_scale, state.state2.absmax), "fp32 scale per 256 absmax"
    assert torch.equal(ours.absmax_codes, state.absmax), "8-bit absmax codes"
    assert torch.equal(ours.dequantize(), bnb.dequantize_4bit(packed, state))
    packed16, state16 = bnb_quantize(w.bfloat16())
    assert torch.equal(
        quant.quantize(w.bfloat16()).dequantize(torch.bfloat16), bnb.dequantize_4bit(packed16, state16)
    )


def test_absmax_codes_follow_the_cpu_kernels_lookup_not_the_true_nearest():
    """bitsandbytes' CPU kernel rounds the absmax through a 65,536-point lookup, so some codes are one step
    from the true nearest level. Ours match its codes exactly there too; the true nearest would not."""
    w = weights()["1024x2816 normal"]
    state = bnb_quantize(w)[1]
    absmax = w.view(-1, 64).abs().amax(1)
    x = (absmax - absmax.mean()).view(-1, 256)
    scaled = (x * (1 / x.abs().amax(1, keepdim=True))).flatten()
    code = quant.dynamic_map()
    nearest = (scaled[:, None] - code).abs().argmin(1)
    off = nearest != state.absmax.long()
    assert 0 < off.float().mean() < 0.005  # ~0.15%: they exist, and they are few
    assert torch.equal(quant.quantize(w).absmax_codes, state.absmax)


def test_reconstruction_error_is_bitsandbytes_published_figure():
    """bitsandbytes' test_4bit_quant publishes, for NF4 with blocks of 64 on a 1024x1024 N(0, 1) matrix,
    mean absolute error 0.072792 and mean relative error 0.203299 (its single-quantized statistics; double
    quantization adds ~1e-4). Ours is the same reconstruction, so the same figures within their spread."""
    torch.manual_seed(0)
    w = torch.randn(1024, 1024)
    err = (quant.quantize(w).dequantize() - w).abs()
    assert abs(err.mean().item() - 0.072792) < 3e-4
    assert abs((err / (w.abs() + 1e-8)).mean().item() - 0.203299) < 1e-3
    single_bnb = bnb.dequantize_4bit(*bnb.quantize_4bit(w, blocksize=64, quant_type="nf4"))
    assert err.mean() > (single_bnb - w).abs().mean()  # the 8-bit absmax costs a little


def test_nf4linear_forward_backward_equal_a_dense_layer_of_its_weight():
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 192, bias=False)
    layer = quant.NF4Linear.from_linear(linear)
    assert layer.weight.dtype == torch.float32 and layer.weight.is_meta  # T5 reads wo.weight.dtype
    w = bnb.dequantize_4bit(*bnb_quantize(linear.weight.detach()))
    x = torch.randn(3, 5, 128, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    out = layer(x)
    assert torch.equal(out, F.linear(x2, w))
    g = torch.randn_like(out)
    out.backward(g)
    F.linear(x2, w).backward(g)
    assert torch.allclose(x.grad, x2.grad, atol=1e-6, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = layer(x)
    assert out16.dtype == torch.bfloat16
    assert torch.equal(out16, F.linear(x.detach().bfloat16(), w.bfloat16()))

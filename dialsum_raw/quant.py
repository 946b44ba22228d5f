"""NF4 with double quantization (QLoRA, Dettmers et al. 2023) in plain torch, and the NF4Linear base layer.

A weight is cut into blocks of 64 values. Each block keeps its absolute maximum, and each value the index
(4 bits, two a byte) of the nearest of the 16 NF4 levels to value / absmax. Double quantization stores the
absmax constants themselves in 8 bits: less their mean, in blocks of 256 with an fp32 absmax each, coded
with the signed 8-bit dynamic map. 4 + (8 + 32/256) / 64 = 4.127 bits a weight, as bitsandbytes.

The codes are bitsandbytes 0.50.2's, bit for bit (tests/test_quant.py): the same levels, the same
midpoint rule for the 4-bit codes, and for the 8-bit codes the same 65,536-entry lookup its CPU kernel
rounds through (about 0.15% of them are one step off the true nearest; matching keeps the weights equal).
Nothing here imports bitsandbytes; CPU and CUDA run the same code.
"""

import torch
from torch import nn
from torch.nn import functional as F

BLOCK = 64  # weights per absmax
ABSMAX_BLOCK = 256  # absmax constants per fp32 scale (double quantization)

# The 16 NF4 levels: quantiles of N(0, 1) with an exact zero, scaled to [-1, 1] (bitsandbytes' table).
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
LUT_STEPS = 65535  # the 8-bit codes go through a lookup of 65,536 evenly spaced points of [-1, 1]


def dynamic_map() -> torch.Tensor:
    """The signed 8-bit dynamic map (Dettmers 2016) for the absmax codes: for each exponent 10^-6 .. 10^0 the
    midpoints of an evenly split [0.1, 1] (2^i of them), both signs, plus 0 and 1; sorted, 256 values.
    Built in the same float32 steps as bitsandbytes' create_dynamic_map, so the values are its values."""
    data = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist() + (-(10 ** (-6 + i)) * means).tolist()
    return torch.tensor(sorted(data + [0.0, 1.0]), dtype=torch.float32)


def nf4_bytes(n) -> int:
    """Bytes of an NF4 weight of n values: the codes, one absmax code per 64, an fp32 scale per 256 of those,
    the fp32 offset."""
    blocks = -(-n // BLOCK)
    return -(-n // 2) + blocks + 4 * -(-blocks // ABSMAX_BLOCK) + 4


def _midpoints(levels):
    return (levels[:-1] + levels[1:]) / 2


def _blocks(flat, size):
    """flat (fp32) as rows of `size`, the last one padded with zeros (which change no absolute maximum)."""
    pad = -flat.numel() % size
    return (F.pad(flat, (0, pad)) if pad else flat).view(-1, size)


class NF4:
    """A quantized weight: `codes` (uint8, two 4-bit level indices a byte, the first in the high nibble),
    `absmax_codes` (uint8, one per block of 64), `absmax_scale` (fp32, one per 256 blocks), `offset` (fp32,
    the mean absmax) and the weight's `shape`."""

    def __init__(self, codes, absmax_codes, absmax_scale, offset, shape):
        self.codes, self.absmax_codes, self.absmax_scale, self.offset = (
            codes,
            absmax_codes,
            absmax_scale,
            offset,
        )
        self.shape = torch.Size(shape)

    def tensors(self) -> dict:
        return {"codes": self.codes, "absmax_codes": self.absmax_codes, "absmax_scale": self.absmax_scale,
                "offset": self.offset}

    def absmax(self) -> torch.Tensor:
        """The fp32 absmax of every block, decoded: dynamic_map[code] * its block's scale + offset."""
        table = _table("dynamic", self.codes.device)
        blocks = table.index_select(0, self.absmax_codes.int())
        scaled = (_blocks(blocks, ABSMAX_BLOCK) * self.absmax_scale[:, None]).flatten()[:blocks.numel()]
        return scaled + self.offset

    def dequantize(self, dtype=torch.float32, scratch=False) -> torch.Tensor:
        """The weight: NF4_LEVELS[code] * absmax, multiplied in fp32 and written in `dtype` in the same pass
        (as .to(dtype) after it would round, without a second buffer). The levels are read as pairs (one int64
        of two fp32 per code byte, gathered with index_select), several times faster than indexing with the
        unpacked codes. With `scratch`, the result and its temporaries live in buffers kept for this size
        (_scratch), valid until the next scratch dequantize of the same size: for a caller that uses the
        weight at once and keeps nothing of it."""
        n, device = self.shape.numel(), self.codes.device
        pairs = _table("pairs", device)
        if scratch and n % BLOCK == 0:
            index, values, out = _scratch(n, dtype, device)
            torch.index_select(pairs, 0, index.copy_(self.codes), out=values)
        else:
            values, out = pairs.index_select(0, self.codes.int()), None
        values = _blocks(values.view(torch.float32), BLOCK)
        out = torch.empty(values.shape, dtype=dtype, device=device) if out is None else out.view(values.shape)
        return torch.mul(values, self.absmax()[:, None], out=out).flatten()[:n].view(self.shape)


_SCRATCH = {}


def _scratch(n, dtype, device):
    """(code index int32, level pairs int64, weight in `dtype`) buffers for a weight of n values (a multiple
    of 64), made once per size and kept: 8 bytes a weight of each distinct layer size. A step dequantizes
    every layer twice; fresh buffers each time would be freed and made again hundreds of times a step, and the
    page faults of that churn cost more than the dequantization (docs/qlora.md)."""
    key = (n, dtype, str(device))
    if key not in _SCRATCH:
        _SCRATCH[key] = (torch.empty(n // 2, dtype=torch.int32, device=device),
                         torch.empty(n // 2, dtype=torch.int64, device=device),
                         torch.empty(n, dtype=dtype, device=device))
    return _SCRATCH[key]


_TABLES = {}


def _table(name, device):
    """Lookup tables, built once per device: "dynamic" (the 8-bit map), "pairs" (for each code byte its two
    NF4 levels, as one int64), "absmax_lut" (for each of the 65,536 lookup points the nearest 8-bit code)."""
    key = (name, str(device))
    if key not in _TABLES:
        if name == "dynamic":
            t = dynamic_map()
        elif name == "pairs":
            levels = torch.tensor(NF4_LEVELS, dtype=torch.float32)
            byte = torch.arange(256)
            t = (
                torch.stack([levels[byte >> 4], levels[byte & 15]], dim=1)
                .contiguous()
                .view(torch.int64)
                .flatten()
            )
        else:
            points = torch.arange(LUT_STEPS + 1, dtype=torch.float32) / LUT_STEPS * 2 - 1
            t = torch.bucketize(points, _midpoints(dynamic_map()), out_int32=True)
        _TABLES[key] = t.to(device)
    return _TABLES[key]


@torch.no_grad()
def quantize(weight: torch.Tensor) -> NF4:
    """NF4 codes with double-quantized absmax constants, as bitsandbytes' quantize_4bit(quant_type="nf4",
    blocksize=64, compress_statistics=True) computes them (ties of the 4-bit codes go to the lower level;
    values are scaled by the reciprocal of the absmax, as it does)."""
    flat = weight.detach().reshape(-1).float()
    n = flat.numel()
    blocks = _blocks(flat, BLOCK)
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).flatten()[:n]
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=flat.device)
    q = torch.bucketize(scaled, _midpoints(levels), out_int32=True).to(torch.uint8)
    q = F.pad(q, (0, n % 2))
    codes = (q[0::2] << 4) | q[1::2]
    offset = absmax.mean()
    absmax_codes, absmax_scale = _quantize_8bit(absmax - offset)
    return NF4(codes, absmax_codes, absmax_scale, offset, weight.shape)


def _quantize_8bit(x):
    """(uint8 codes, fp32 scale per 256) of the dynamic map, through the 65,536-point lookup of
    bitsandbytes' CPU kernel: point = floor((x / scale + 1) * 32767.5 + 0.5), code = the point's nearest."""
    blocks = _blocks(x, ABSMAX_BLOCK)
    scale = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / scale.clamp(min=1e-38))[:, None], -1, 1).flatten()[:x.numel()]
    point = torch.floor((scaled + 1) * (LUT_STEPS / 2) + 0.5).long()
    return _table("absmax_lut", x.device).index_select(0, point).to(torch.uint8), scale


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul with x runs in: autocast's when it is on for x's device, else x's own."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


class _NF4Matmul(torch.autograd.Function):
    """x W^T with W dequantized in forward and again in backward: nothing of W is kept between them, so a
    step never holds more than one layer's dequantized weight (keeping it would hold every layer's, 2 bytes
    a weight, for the whole forward-backward), and that one in the scratch buffers of its size. The base is
    frozen: the gradient is the input's alone."""

    @staticmethod
    def forward(ctx, x, layer, dtype):
        ctx.layer, ctx.dtype = layer, dtype
        return F.linear(x, layer.nf4().dequantize(dtype, scratch=True))

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype) @ ctx.layer.nf4().dequantize(ctx.dtype, scratch=True), None, None


class NF4Linear(nn.Module):
    """A frozen nn.Linear stored in NF4: 0.52 bytes a weight instead of 4. Its forward dequantizes to the
    compute dtype (autocast's, else the input's).

    `weight` is a meta tensor: the shape and the float dtype of the layer, no values. T5's feed-forward reads
    wo.weight.dtype to cast its input (a weight reporting uint8 breaks it, as bitsandbytes' Linear4bit does);
    readers that need the values call dequantize(). The quantized tensors are buffers (they follow
    .to(device)) but not state: a run saves its adapter, and loading quantizes the base again, bit for bit the
    same. `source` (file, tensor name) says where the original weight is, for inits that need it
    (original_weight)."""

    def __init__(self, nf4: NF4, bias=None, dtype=torch.float32, source=None):
        super().__init__()
        self.out_features, self.in_features = nf4.shape
        self.store(nf4)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        self.weight = torch.empty(nf4.shape, dtype=dtype, device="meta")
        self.source = source

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype=None):
        """The Linear quantized; `dtype` (else its own) is reported. Without a source, the original is not
        kept."""
        return cls(quantize(linear.weight), linear.bias, dtype or linear.weight.dtype)

    def store(self, nf4: NF4):
        """Hold these quantized tensors (a residual init re-quantizes the layer's weight with this)."""
        for name, t in nf4.tensors().items():
            self.register_buffer(name, t, persistent=False)

    def nf4(self) -> NF4:
        return NF4(
            self.codes,
            self.absmax_codes,
            self.absmax_scale,
            self.offset,
            (self.out_features, self.in_features),
        )

    def dequantize(self, dtype=None) -> torch.Tensor:
        return self.nf4().dequantize(dtype or self.weight.dtype)

    def forward(self, x):
        dtype = compute_dtype(x)
        out = _NF4Matmul.apply(x.to(dtype), self, dtype)
        return out if self.bias is None else out + self.bias.to(dtype)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4, {self.weight.dtype}"


def quantized_linears(model):
    """(name, module) of every NF4Linear of a model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, NF4Linear)]


def dequantize_model(model):
    """Every NF4Linear replaced by an nn.Linear holding its dequantized weight in fp32 (lora merge writes the
    merged model in fp32 or bf16; it never quantizes again)."""
    for name, m in quantized_linears(model):
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        linear.weight = nn.Parameter(m.dequantize(torch.float32), requires_grad=False)
        if m.bias is not None:
            linear.bias = nn.Parameter(m.bias.float(), requires_grad=False)
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, linear)
    return model


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """The weight's values: dequantized (in the reported dtype) for an NF4Linear, the parameter otherwise."""
    return linear.dequantize() if isinstance(linear, NF4Linear) else linear.weight


def original_weight(linear: nn.Module) -> torch.Tensor:
    """The weight before quantization, in fp32, for the inits that decompose it (PiSSA, OLoRA, MiCA, LoftQ):
    read again from the model's file for an NF4Linear; the parameter itself otherwise."""
    if not isinstance(linear, NF4Linear):
        return linear.weight.float()
    from .modeling import read_safetensors
    path, key = linear.source
    return next(t for _, _, t in read_safetensors([path], {key})).float().to(linear.codes.device)


def stored_weight(linear: nn.Module):
    """A copy of what a base layer stores (its NF4, or its weight), for set_weight to put back bit for bit."""
    return linear.nf4() if isinstance(linear, NF4Linear) else linear.weight.detach().clone()


@torch.no_grad()
def set_weight(linear: nn.Module, weight):
    """Replace a base layer's weight: an NF4 as it is, a float weight quantized again for an NF4Linear and
    cast to the weight's dtype otherwise."""
    if isinstance(linear, NF4Linear):
        linear.store(weight if isinstance(weight, NF4) else quantize(weight))
    else:
        linear.weight.copy_(weight.to(linear.weight.dtype))


def device_of(linear: nn.Module) -> torch.device:
    """Where a base layer's tensors are (an NF4Linear's `weight` is on the meta device)."""
    return linear.codes.device if isinstance(linear, NF4Linear) else linear.weight.device

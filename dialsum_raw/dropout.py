"""Dropout at a third of torch's CPU cost, for every dropout site in T5 and in the LoRA layers.

torch's CPU dropout draws its mask with `bernoulli_`, one double-precision draw per element, and in
bf16 applies it through a slow bool multiply: in a bf16 training step of flan-t5-small on long
dialogues the masks took more time than the matmuls. Here one 64-bit draw of torch's default
generator yields the keep/drop bits of four elements (16 bits each, so p is exact to 1/65,536), and
the mask is applied as a uint8 multiply. The mask is saved for backward (one byte per element, as
torch saves its own) and reused there, never redrawn. Because every bit comes from torch's default
generator, torch.manual_seed, per-rank seeds, a checkpoint's saved RNG state and checkpointing's
recompute (which restores that state) work as they do with nn.Dropout.

`--dropout-impl torch` keeps nn.Dropout and HF's attention bit for bit (the oracle tests pin it).
Off the CPU torch's fused kernels are already fast, so there "fast" uses them.
"""

import torch
from torch import nn
from torch.nn import functional as F

ATTENTION = "dialsum_fast_dropout"  # the name T5's attention is registered under (see use_fast_attention)


def keep_mask(shape, p, device=None):
    """A uint8 tensor of `shape`: 1 with probability 1 - p (to 1/65,536), from torch's default generator."""
    n = torch.Size(shape).numel()
    draws = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2 ** 63, None)  # all 64 bits
    lanes = draws.view(torch.int16)[:n].view(shape)  # uniform on [-32768, 32767]
    return (lanes >= round(p * 65536) - 32768).view(torch.uint8)


class _Dropout(torch.autograd.Function):
    """x * keep / (1 - p); backward multiplies by the same saved mask."""

    @staticmethod
    def forward(ctx, x, p):
        keep = keep_mask(x.shape, p, x.device)
        ctx.save_for_backward(keep)
        ctx.scale = 1 / (1 - p)
        return (x * keep).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad):
        keep, = ctx.saved_tensors
        return (grad * keep).mul_(ctx.scale), None


def dropout(x, p, training=True):
    """F.dropout's contract with the fast mask on CPU (torch's own kernel elsewhere)."""
    if not training or p == 0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    return _Dropout.apply(x, p)


class Dropout(nn.Dropout):
    """nn.Dropout with the fast mask; a subclass, so `.p` and isinstance(m, nn.Dropout) checks still hold."""

    def forward(self, x):
        return dropout(x, self.p, self.training)


def attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, position_bias=None, **kwargs
):
    """T5's attention with the fast dropout on its probabilities; registered with transformers'
    AttentionInterface.

    Without dropout (eval, generation) or off the CPU it is HF's sdpa path itself, so outputs match bit for
    bit. Training on CPU: torch's sdpa falls back to its math kernel whenever dropout > 0 and draws that
    mask with bernoulli_; this is the same math (scores + bias-and-mask, softmax in fp32, dropout, @ V)
    with the fast mask. The additive mask is built by HF's own helper, as its sdpa path builds it."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if not dropout or query.device.type != "cpu":
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            position_bias=position_bias,
            **kwargs,
        )
    is_causal = kwargs.get("is_causal")  # decided as HF's sdpa path decides it
    if (
        query.shape[2] > 1
        and attention_mask is None
        and (is_causal if is_causal is not None else module.is_causal)
    ):
        attention_mask = torch.ones(
            query.shape[2], key.shape[2], dtype=torch.bool, device=query.device
        ).tril()
    scores = torch.matmul(query, key.transpose(2, 3))
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if scale != 1:  # T5 folds its scale into the weights: 1
        scores = scores * scale
    scores = scores + position_bias
    if attention_mask is not None:  # added in place, so backward spends nothing on it
        scores = scores.add_(torch.zeros(attention_mask.shape, dtype=scores.dtype, device=scores.device)
                             .masked_fill_(~attention_mask, torch.finfo(scores.dtype).min))
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    probs = _Dropout.apply(probs, dropout)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def use_fast_attention(model):
    """Route the model's attention through `attention` (registered once, with HF's sdpa masks)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    model.set_attn_implementation(ATTENTION)

"""How A and B start: one small function per scheme, in one table.

A function sets layer.lora_A and layer.lora_B (in place, under no_grad). A scheme that moves part of W
into the adapter (`residual`) calls layer.keep_residual(A0, B0), so the layer still starts out equal to its
base; its layers are their variant's class with Residual mixed in (layers.layer_class), which saves the
adapter against the original W. `frozen` names the tensors that do not train.
"""

import functools
import math
from typing import Callable, NamedTuple

import torch
from torch import nn

from ..errors import need
from ..quant import NF4Linear, original_weight, quantize, set_weight


class Init(NamedTuple):
    start: Callable
    residual: bool = False  # W becomes W - s B0 A0; the layer is its Residual form (below)
    from_w: bool = False  # A or B are cut from W's decomposition: the rank is at most min(in, out)
    frozen: tuple = ()
    peft: object = True  # peft's init_lora_weights for the exported adapter (its tensors are loaded over it)
    rebase: bool = (
        False  # it stores a base weight of its own (LoftQ): loading runs it again, then fills A and B
    )


def kaiming(layer):
    """A as nn.Linear's own init (as loralib and peft), B = 0: the update starts at zero."""
    nn.init.kaiming_uniform_(layer.lora_A, a=math.sqrt(5))


def gaussian(layer):
    """peft's "gaussian": A ~ N(0, (1/r)^2), B = 0."""
    nn.init.normal_(layer.lora_A, std=1 / layer.cfg.rank)


def pissa(layer):
    """PiSSA: W = U S V^T; A = sqrt(S_r / s) V_r^T, B = U_r sqrt(S_r / s), so s B A is W's best rank-r part
    (peft's pissa_init), and W keeps the residual."""
    u, s, vh = torch.linalg.svd(original_weight(layer.base), full_matrices=False)
    r = layer.cfg.rank
    root = (s[:r] / layer.scaling).sqrt()
    layer.keep_residual(torch.diag(root) @ vh[:r], u[:, :r] @ torch.diag(root))


def olora(layer):
    """OLoRA: W = Q R; B = Q_r (orthonormal columns), A = R_r, and W keeps W - s B A (peft's olora_init)."""
    q, rr = torch.linalg.qr(original_weight(layer.base))
    r = layer.cfg.rank
    layer.keep_residual(rr[:r], q[:, :r])


def mica(layer):
    """MiCA, PiSSA's opposite: B = W's r left singular vectors of the *smallest* singular values, frozen;
    A = 0 trains, so W is unchanged (peft's mica_init)."""
    u = torch.linalg.svd(original_weight(layer.base), full_matrices=False).U
    layer.lora_B.copy_(u[:, -layer.cfg.rank:])
    layer.lora_A.zero_()


def loftq(layer):
    """LoftQ (Li et al. 2023, Alg. 1) on the original fp32 W: Q = nf4(W - s B A) and (A, B) = the best rank-r
    approximation of W - deq(Q), alternated cfg.loftq_iter times from B A = 0, so that deq(Q) + s B A is
    closer to W than nf4(W) is. The base stores Q; B A = U_r S_r V_r^T / s, split by sqrt(S_r / s) as PiSSA.
    Deterministic (no random draw), so loading computes the same Q again (Init.rebase)."""
    need(isinstance(layer.base, NF4Linear), "--lora-init loftq quantizes the base: it needs --base-dtype nf4")
    w, r, s = original_weight(layer.base), layer.cfg.rank, layer.scaling
    low_rank = torch.zeros_like(w)
    for _ in range(layer.cfg.loftq_iter):
        q = quantize(w - low_rank)
        u, sv, vh = torch.linalg.svd(w - q.dequantize(), full_matrices=False)
        root = (sv[:r] / s).sqrt()
        a, b = root[:, None] * vh[:r], u[:, :r] * root
        low_rank = s * b @ a
    layer.base.store(q)
    layer.lora_A.copy_(a)
    layer.lora_B.copy_(b)


INITS = {
    "kaiming": Init(kaiming),
    "gaussian": Init(gaussian),
    "pissa": Init(pissa, residual=True, from_w=True),
    "olora": Init(olora, residual=True, from_w=True),
    "mica": Init(mica, frozen=("lora_B",), peft="mica", from_w=True),
    "loftq": Init(loftq, from_w=True, rebase=True),
}


class Residual:
    """A LoRA layer after a residual init: W holds W - s B0 A0 and the adapter starts at (A0, B0), so the
    output is unchanged. On disk it is a plain LoRA for the original W, of rank 2r: W_res + s B A = W + s (B A
    - B0 A0), i.e. A' = [A; A0], B' = [B, -B0], with alpha x2 (x sqrt 2 with rsLoRA) so the scale stays s, as
    peft's save_pretrained(path_initial_model_for_weight_conversion=...) writes it. Mixed in before the
    variant's class by residual_form."""

    @torch.no_grad()
    def keep_residual(self, a0, b0):
        """Start the adapter at (A0, B0) and W at W - s B0 A0, the residual of the original fp32 W stored as
        the base stores (quantized again on a 4-bit base); A0 and B0 are kept for saved()."""
        w = original_weight(self.base)
        a0, b0 = a0.to(w.device, torch.float32), b0.to(w.device, torch.float32)
        set_weight(self.base, w - self.scaling * b0 @ a0)
        self.register_buffer("lora_A0", a0.clone(), persistent=False)
        self.register_buffer("lora_B0", b0.clone(), persistent=False)
        self.lora_A.copy_(a0)
        self.lora_B.copy_(b0)

    def saved(self):
        saved = super().saved()
        a, b = saved["lora_A"], saved["lora_B"]
        return {**saved, "lora_A": torch.cat([a, self.lora_A0.to(a.dtype)]),
                "lora_B": torch.cat([b, -self.lora_B0.to(b.dtype)], dim=1)}

    @torch.no_grad()
    def load(self, saved):
        """The trained rank-r form on W - s B0 A0 again."""
        r, a, b = self.cfg.rank, saved["lora_A"], saved["lora_B"]
        self.keep_residual(a[r:], -b[:, r:])
        super().load({**saved, "lora_A": a[:r], "lora_B": b[:, :r]})

    @staticmethod
    def saved_rank_alpha(cfg):
        return 2 * cfg.rank, cfg.alpha * (2 ** 0.5 if cfg.rslora else 2)

    @classmethod
    def saved_shapes(cls, cfg, base):
        r = cls.saved_rank_alpha(cfg)[0]
        return {
            **super().saved_shapes(cfg, base),
            "lora_A": (r, base.in_features),
            "lora_B": (base.out_features, r),
        }

    @classmethod
    def peft_config(cls, cfg):
        r, alpha = cls.saved_rank_alpha(cfg)
        return {**super().peft_config(cfg), "r": r, "lora_alpha": alpha}


@functools.cache
def residual_form(cls):
    """cls with Residual mixed in: one class per variant, made once."""
    return type(f"Residual{cls.__name__}", (Residual, cls), {"__module__": cls.__module__})

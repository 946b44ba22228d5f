"""How A and B start: one small function per scheme, in one table.

A function sets layer.lora_A and layer.lora_B (in place, under no_grad). A scheme that moves part of W
into the adapter calls layer.keep_residual(A0, B0), so the layer still starts out equal to its base and
the adapter is saved against the original W (`residual`). `frozen` names the tensors that do not train.
"""

import math
from typing import Callable, NamedTuple

import torch
from torch import nn


class Init(NamedTuple):
    start: Callable
    residual: bool = False  # W becomes W - s B0 A0; the adapter is saved in a rank-2r form for the original W
    from_w: bool = False  # A or B are cut from W's decomposition: the rank is at most min(in, out)
    frozen: tuple = ()
    peft: object = True  # peft's init_lora_weights for the exported adapter (its tensors are loaded over it)


def kaiming(layer):
    """A as nn.Linear's own init (as loralib and peft), B = 0: the update starts at zero."""
    nn.init.kaiming_uniform_(layer.lora_A, a=math.sqrt(5))


def gaussian(layer):
    """peft's "gaussian": A ~ N(0, (1/r)^2), B = 0."""
    nn.init.normal_(layer.lora_A, std=1 / layer.cfg.rank)


def pissa(layer):
    """PiSSA: W = U S V^T; A = sqrt(S_r / s) V_r^T, B = U_r sqrt(S_r / s), so s B A is W's best rank-r part
    (peft's pissa_init), and W keeps the residual."""
    u, s, vh = torch.linalg.svd(layer.base.weight.float(), full_matrices=False)
    r = layer.cfg.rank
    root = (s[:r] / layer.scaling).sqrt()
    layer.keep_residual(torch.diag(root) @ vh[:r], u[:, :r] @ torch.diag(root))


def olora(layer):
    """OLoRA: W = Q R; B = Q_r (orthonormal columns), A = R_r, and W keeps W - s B A (peft's olora_init)."""
    q, rr = torch.linalg.qr(layer.base.weight.float())
    r = layer.cfg.rank
    layer.keep_residual(rr[:r], q[:, :r])


def mica(layer):
    """MiCA, PiSSA's opposite: B = W's r left singular vectors of the *smallest* singular values, frozen;
    A = 0 trains, so W is unchanged (peft's mica_init)."""
    u = torch.linalg.svd(layer.base.weight.float(), full_matrices=False).U
    layer.lora_B.copy_(u[:, -layer.cfg.rank:])
    layer.lora_A.zero_()


INITS = {"kaiming": Init(kaiming), "gaussian": Init(gaussian), "pissa": Init(pissa, residual=True, from_w=True),
         "olora": Init(olora, residual=True, from_w=True),
         "mica": Init(mica, frozen=("lora_B",), peft="mica", from_w=True)}

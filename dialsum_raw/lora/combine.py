"""Adapters combined into one ordinary plain-LoRA adapter, exactly, from each layer's ΔW.

    python -m dialsum_raw.lora combine DIR... --out DIR --method linear|cat|svd|ties|dare
        [--weights w1,w2,...] [--rank R] [--density d] [--seed S] [--base MODEL]

Each input's per-layer update ΔW_i is read through its layers' delta_weight() against the original base
(adapter.updates), so every variant and init combines exactly: rsLoRA's alpha/sqrt(r), DoRA's magnitude,
VeRA's projections, PiSSA's and OLoRA's residual W. (peft's add_weighted_adapter mixes A and B factors and
is off for several of them: peft #3761.) Per layer, with weights w_i (default 1/n each, a "soup"):

- linear, svd: Σ w_i ΔW_i. (Both names, as peft names them; here both combine ΔW, which is exact.)
- cat: A = [A_1; A_2; ...], B = [w_1 s_1 B_1, w_2 s_2 B_2, ...], the saved factors and scales: exact at rank
  r_1 + r_2 + ..., without an SVD; plain LoRA inputs (any init) with the same targets only.
- ties: each ΔW_i keeps its int(density x size) largest magnitudes (peft's magnitude_based_pruning); per
  element the sign of Σ trimmed ΔW_i is elected (+ on a tie); the sum of w_i ΔW_i over the inputs whose
  trimmed ΔW_i has that sign, divided by their count (peft's ties, "total" sign method).
- dare: each element of each ΔW_i is kept where a uniform draw is below `density` and divided by density,
  then Σ w_i ΔW_i (peft's dare_linear). One generator seeded with S; per layer in model order, per input in
  order, one draw per element in row-major order: the same seed gives the same adapter.

Except for cat, the combined ΔW is then factorized by a truncated SVD, ΔW ≈ U_R S_R V_R^T with B = U_R S_R^½,
A = S_R^½ V_R^T and alpha = R (scale 1). R defaults to the largest numerical rank of any layer's ΔW, which
is exact (a soup of plain rank-r adapters: n r; DoRA, ties and dare: usually full); a smaller --rank is the
best rank-R approximation, and the relative error it leaves is printed. Inputs may target different layers
(an input adds nothing where it has no layer), except for cat.
"""

import argparse
import os
import shutil

import torch

from ..errors import UserError
from . import adapter as lora
from .config import LoRAConfig

METHODS = ("linear", "svd", "cat", "ties", "dare")
HELP = (
    "combine adapters into one plain-LoRA adapter: linear/svd, cat, ties or dare over each layer's exact ΔW"
)


def ties(deltas, weights, density):
    """TIES-merging of one layer's updates (see the module docstring)."""
    trimmed = torch.stack([keep_largest(d, density) for d in deltas])
    elected = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0).to(trimmed.dtype)
    agree = trimmed.sign() == elected
    w = torch.tensor(weights, dtype=trimmed.dtype).view(-1, *[1] * (trimmed.dim() - 1))
    return (trimmed * w * agree).sum(0) / agree.sum(0).clamp(min=1)


def keep_largest(delta, density):
    """delta with all but its int(density x size) largest magnitudes set to 0."""
    k = int(density * delta.numel())
    kept = torch.zeros(delta.numel(), dtype=delta.dtype)
    top = delta.abs().flatten().topk(k).indices
    kept[top] = delta.flatten()[top]
    return kept.view_as(delta)


def dare(deltas, weights, density, generator):
    """DARE: random drop with rescale, then the weighted sum (see the module docstring)."""
    return sum(w * d * (torch.rand(d.shape, generator=generator, dtype=torch.float64) < density) / density
               for d, w in zip(deltas, weights))


def factorize(delta, rank):
    """(A, B, relative error) of the best rank-`rank` B A of delta (scale 1); zero rows/columns past its
    size."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, len(s))
    root = s[:k].sqrt()
    a, b = (
        torch.zeros(rank, delta.shape[1], dtype=delta.dtype),
        torch.zeros(delta.shape[0], rank, dtype=delta.dtype),
    )
    a[:k], b[:, :k] = root[:, None] * vh[:k], u[:, :k] * root
    norm = float(delta.norm())
    return a, b, float(s[k:].norm()) / norm if norm else 0.0


def numerical_rank(delta):
    """Singular values above the top one x max(shape) x fp32's eps (ΔW comes from fp32 tensors): numpy's
    rule."""
    s = torch.linalg.svdvals(delta)
    return (
        int((s > s[0] * max(delta.shape) * torch.finfo(torch.float32).eps).sum())
        if len(s) and s[0] > 0
        else 0
    )


def read_inputs(directories, base):
    """[(LoRAConfig, tensors)] of the input adapters and the base they share; different bases are refused."""
    read = [lora.read_adapter(d) for d in directories]
    other = next((i for i, (_, _, b) in enumerate(read) if b != read[0][2]), None)
    if other is not None:
        raise UserError(f"the adapters were trained on different bases: {directories[0]} on {read[0][2]}, "
                        f"{directories[other]} on {read[other][2]}; combine adapters of one base")
    return [(cfg, tensors) for cfg, tensors, _ in read], base or read[0][2]


def combine(directories, out, method, weights=None, rank=None, density=None, seed=0, base=None):
    """Write the combined adapter to `out`; returns (its LoRAConfig, the largest relative truncation
    error)."""
    from ..modeling import load_model
    if method not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if not directories:
        raise UserError("give at least one adapter to combine")
    weights = list(weights) if weights is not None else [1 / len(directories)] * len(directories)
    if len(weights) != len(directories):
        raise UserError(f"--weights has {len(weights)} values for {len(directories)} adapters")
    if (density is not None) != (method in ("ties", "dare")):
        raise UserError(
            f"--density is for ties and dare (the share of each ΔW kept), not {method}"
            if density is not None
            else f"--method {method} needs --density (the share of each ΔW kept, e.g. 0.3)"
        )
    if density is not None and not 0 < density <= 1:
        raise UserError(f"--density must be in (0, 1], got {density}")
    if rank is not None and (rank < 1 or method == "cat"):
        raise UserError("cat keeps every input's rank (their sum): drop --rank" if method == "cat" else
                        f"--rank must be >= 1, got {rank}")
    if os.path.exists(out):
        raise UserError(f"--out {out} already exists; give a new folder")
    inputs, base = read_inputs(directories, base)
    if method == "cat":
        for d, (cfg, _) in zip(directories, inputs):
            if cfg.variant != "lora":
                raise UserError(
                    f"cat concatenates plain LoRA factors, and {d} is {cfg.variant}: use --method linear "
                    "(exact at full rank)"
                )
            if set(cfg.targets) != set(inputs[0][0].targets):
                raise UserError(f"cat needs the same targets in every adapter: {directories[0]} has "
                                f"{','.join(inputs[0][0].targets)}, {d} has {','.join(cfg.targets)}")
    model = load_model(base)
    for d, (cfg, _) in zip(directories, inputs):
        lora.check_adapter(model, d)  # every adapter must fit the base exactly before any work
    targets = tuple(dict.fromkeys(t for cfg, _ in inputs for t in cfg.targets))
    if method == "cat":
        factors = cat(model, inputs, weights)
        error = 0.0
    else:
        combined = combine_updates(model, inputs, weights, method, density, seed)
        rank = rank or max(1, max(numerical_rank(d) for d in combined.values()))
        factors, error = {}, 0.0
        for name, delta in combined.items():
            a, b, err = factorize(delta, rank)
            factors[name], error = (a, b), max(error, err)
    r = next(iter(factors.values()))[0].shape[0]
    cfg = LoRAConfig(targets=targets, rank=r, alpha=float(r), dropout=0.0)  # scale 1: B A is the update
    tensors = {f"{name}.{key}": t.float() for name, (a, b) in factors.items()
               for key, t in (("lora_A", a), ("lora_B", b))}
    lora.apply_adapter(model, cfg, tensors)
    tmp = f"{out.rstrip(os.sep)}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    lora.save_adapter(model, tmp, base_model=base)
    os.replace(tmp, out)
    return cfg, error


def combine_updates(model, inputs, weights, method, density, seed):
    """{layer: combined ΔW (fp64)} over the union of the inputs' layers, in model order."""
    per_input = [{name: dw for name, dw, _ in lora.updates(model, cfg, tensors)} for cfg, tensors in inputs]
    layers = [n for n, _ in model.named_modules() if any(n in u for u in per_input)]
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name in layers:
        deltas = [
            u.get(name, torch.zeros_like(next(u[name] for u in per_input if name in u))) for u in per_input
        ]
        if method == "ties":
            out[name] = ties(deltas, weights, density)
        elif method == "dare":
            out[name] = dare(deltas, weights, density, generator)
        else:
            out[name] = sum(w * d for w, d in zip(weights, deltas))
    return out


def cat(model, inputs, weights):
    """{layer: (A, B)}: the inputs' saved factors stacked, each B times its weight and scale (residual inits
    are saved for the original base at the same scale, so their saved factors cat as they are)."""
    names = lora.target_layers(model, inputs[0][0].targets)
    return {
        name: (
            torch.cat([t[f"{name}.lora_A"].double() for _, t in inputs]),
            torch.cat(
                [w * cfg.scaling * t[f"{name}.lora_B"].double() for w, (cfg, t) in zip(weights, inputs)],
                dim=1,
            ),
        )
        for name in names
    }


def _floats(text):
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")


def add_arguments(p):
    p.add_argument("adapters", nargs="+", metavar="DIR", help="adapter folders (train.py's best/ or last/)")
    p.add_argument("--out", required=True, help="the combined adapter's folder (must not exist)")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument(
        "--weights", type=_floats, help="one weight per adapter, comma-separated (default: 1/n each)"
    )
    p.add_argument(
        "--rank",
        type=int,
        help="rank of the result (default: exact, the largest numerical rank of any "
        "layer's combined ΔW; not with cat)",
    )
    p.add_argument("--density", type=float, help="ties, dare: the share of each ΔW kept")
    p.add_argument("--seed", type=int, default=0, help="dare: the seed of its random drop (default 0)")
    p.add_argument(
        "--base", help="hub id or folder of the base (default: the one the adapters name in adapter.json)"
    )


def run(a):
    cfg, error = combine(a.adapters, a.out, a.method, a.weights, a.rank, a.density, a.seed, a.base)
    print(
        f"wrote {a.out}: plain LoRA, rank {cfg.rank}, on {','.join(cfg.targets)} ({a.method} of "
        f"{len(a.adapters)}; "
        f"largest relative error ||ΔW - B A||_F / ||ΔW||_F over layers {error:.1e})"
    )

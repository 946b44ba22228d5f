"""What an adapter learned, per layer: the size, spectrum and direction of its update ΔW.

    python -m dialsum_raw.lora inspect ADAPTER --base MODEL [--compare ADAPTER2] [--json] [--plot DIR]

ΔW is the change of the effective weight against the original base, read through each layer's own
delta_weight() (plus the change of W itself after a residual init such as PiSSA), so every variant is
covered without code of its own here. k is the layer's rank (DoRA's or PiSSA's ΔW may have more
directions; these are its top k). The per-layer figures all come from layer_stats:
- fro_norm ||ΔW||_F, rel_norm ||ΔW||_F / ||W||_F;
- singular_values: the top k of ΔW;
- effective_rank: exp of the entropy of those values normalized to sum 1 (Roy & Vetterli, 2007): 1 when one
  direction carries the update, k when all k carry it equally;
- amplification: ||ΔW||_F / ||U^T W V||_F with U, V the top-k singular vectors of ΔW (LoRA paper, 7.3): large
  when ΔW amplifies directions that W barely uses;
- with --compare, phi(i, j) = ||V1_i^T V2_j||_F^2 / min(i, j), V the top right-singular vectors of each
  adapter's ΔW (LoRA paper, 7.2, which takes them from A; for plain LoRA both span A's row space, ordered here
  by ΔW's singular values): the share of the smaller subspace inside the larger. Random subspaces of R^n give
  E[phi(i, j)] = max(i, j) / n.
"""

import json
import os
import re
import sys

import torch

from ..errors import UserError
from . import adapter as lora

HELP = "per-layer norms, spectra, amplification and (with --compare) subspace similarity of an adapter"
KEYS = ("layer", "fro_norm", "rel_norm", "singular_values", "effective_rank", "amplification")
GROUPS = {"SelfAttention": "self-attention", "EncDecAttention": "cross-attention", "DenseReluDense": "feed-forward"}


def effective_rank(singular_values: torch.Tensor) -> float:
    p = singular_values[singular_values > 0]
    if p.numel() == 0:
        return 0.0  # no update at all
    p = p / p.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def layer_stats(w: torch.Tensor, dw: torch.Tensor, k: int) -> dict:
    """The per-layer figures for base weight w and update dw (both out x in), from dw's top-k singular triplets."""
    w, dw = w.double(), dw.double()
    u, s, vh = torch.linalg.svd(dw, full_matrices=False)
    fro = float(dw.norm())
    w_part = float((u[:, :k].T @ w @ vh[:k].T).norm())
    return {"fro_norm": fro, "rel_norm": fro / float(w.norm()), "singular_values": s[:k].tolist(),
            "effective_rank": effective_rank(s[:k]), "amplification": fro / w_part if fro else 0.0}


def subspace_similarity(a1: torch.Tensor, a2: torch.Tensor, k1=None, k2=None) -> torch.Tensor:
    """phi(i, j) for i <= k1, j <= k2 (default: all) over the right-singular vectors of a1 and a2, as a matrix whose
    [i-1, j-1] entry is phi(i, j)."""
    v1 = torch.linalg.svd(a1.double(), full_matrices=False).Vh[:k1]  # rows: right-singular vectors, largest first
    v2 = torch.linalg.svd(a2.double(), full_matrices=False).Vh[:k2]
    overlap = ((v1 @ v2.T) ** 2).cumsum(0).cumsum(1)  # [i-1, j-1] = ||V1_i^T V2_j||_F^2
    i = torch.arange(1, len(v1) + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, len(v2) + 1, dtype=torch.float64)[None, :]
    return overlap / torch.minimum(i, j)


def adapter_updates(model, adapter):
    """(config, [(layer, W, ΔW, k)]) for an adapter on `model`'s original weights, in model order; this injects
    the adapter into `model`."""
    cfg, tensors = lora.check_adapter(model, adapter)
    original = {n: model.get_submodule(n).weight.detach().double() for n in lora.target_layers(model, cfg.targets)}
    lora.apply_adapter(model, cfg, tensors)
    out = []
    with torch.no_grad():
        for name, m in lora.lora_layers(model):
            w = original[name]
            out.append((name, w, (m.base.weight.double() - w) + m.delta_weight().double(), m.rank))
    return cfg, out


def inspect(base, adapter, compare=None):
    """(records, config, config of the compared adapter or None); each record has KEYS, plus 'phi' with compare."""
    from ..modeling import load_model
    cfg, updates = adapter_updates(load_model(base), adapter)
    records = [{"layer": name, **layer_stats(w, dw, k)} for name, w, dw, k in updates]
    other = None
    if compare:
        other, updates2 = adapter_updates(load_model(base), compare)
        theirs = {name: (dw, k) for name, _, dw, k in updates2}
        if theirs.keys() != {r["layer"] for r in records}:
            raise UserError(f"--compare {compare} adapts other layers than {adapter}; compare adapters with the "
                            "same targets")
        for record, (name, _, dw, k) in zip(records, updates):
            record["phi"] = subspace_similarity(dw, theirs[name][0], k, theirs[name][1]).tolist()
    return records, cfg, other


def _place(layer):
    """('encoder self-attention', 'q', block) for a T5 layer name; other models fall back to the parent path."""
    side = "decoder" if ".decoder." in f".{layer}" else "encoder"
    block = re.search(r"\.block\.(\d+)\.", layer)
    kind = next((label for key, label in GROUPS.items() if f".{key}." in layer), layer.rsplit(".", 1)[0])
    group = "cross-attention" if kind == "cross-attention" else f"{side} {kind}"
    return group, layer.rsplit(".", 1)[-1], int(block.group(1)) if block else 0


def grouped(records):
    """{group: {target: [(block, record)]}}, in model order (T5: encoder self, decoder self, cross)."""
    out = {}
    for r in records:
        group, target, block = _place(r["layer"])
        out.setdefault(group, {}).setdefault(target, []).append((block, r))
    return out


def table(records, cfg, adapter, base, other=None, compare=None) -> str:
    lines = [f"adapter {adapter}: {cfg.describe()}", f"base    {base}"]
    if other:
        lines.append(f"compare {compare}: {other.describe()}")
    head = f"  {'target':<6} {'block':>5} {'fro_norm':>9} {'rel_norm':>9} {'eff_rank':>8} {'amplif':>7}"
    head += f" {'phi(1,1)':>8} {'phi(r,r)':>8}" if other else ""
    head += "  top singular values"
    for group, targets in grouped(records).items():
        lines += ["", group, head]
        for target, rows in targets.items():
            for block, r in rows:
                row = (f"  {target:<6} {block:>5} {r['fro_norm']:>9.3g} {r['rel_norm']:>9.3g} "
                       f"{r['effective_rank']:>8.2f} {r['amplification']:>7.3g}")
                if other:
                    row += f" {r['phi'][0][0]:>8.3f} {r['phi'][-1][-1]:>8.3f}"
                lines.append(row + "  " + " ".join(f"{v:.3g}" for v in r["singular_values"][:4]))
    lines += ["", "rel_norm = ||ΔW||_F / ||W||_F; eff_rank = exp(entropy of the normalized singular values); "
              "amplif = ||ΔW||_F / ||U^T W V||_F (LoRA paper 7.3)"]
    if other:
        lines.append("phi(i, j) = ||V1_i^T V2_j||_F^2 / min(i, j), V: right-singular vectors of each A "
                     "(LoRA paper 7.2); phi(r,r) at both full ranks; random subspaces give max(i, j) / n, "
                     "n = the layer's input size")
    return "\n".join(lines)


def plot(records, directory) -> list:
    """rel_norm.png (depth x target heatmap) and, with --compare, phi.png (phi grid, mean over depth)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError('--plot needs matplotlib: pip install -e ".[plot]"')
    os.makedirs(directory, exist_ok=True)
    columns = [(g, t, rows) for g, targets in grouped(records).items() for t, rows in targets.items()]
    depth = 1 + max(block for _, _, rows in columns for block, _ in rows)
    grid = torch.full((depth, len(columns)), float("nan"))
    for c, (_, _, rows) in enumerate(columns):
        for block, r in rows:
            grid[block, c] = r["rel_norm"]
    labels = [f"{g.replace(' ', chr(10))}\n{t}" for g, t, _ in columns]
    fig, ax = plt.subplots(figsize=(1.3 * len(columns) + 2, 0.4 * depth + 2), layout="constrained")
    im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set(xticks=range(len(columns)), yticks=range(depth), ylabel="block", title="rel_norm = ||ΔW||_F / ||W||_F")
    ax.set_xticklabels(labels, fontsize=8)
    fig.colorbar(im, ax=ax)
    paths = [os.path.join(directory, "rel_norm.png")]
    fig.savefig(paths[0], bbox_inches="tight")
    plt.close(fig)
    if "phi" in records[0]:
        fig, axes = plt.subplots(1, len(columns), figsize=(2.6 * len(columns) + 1, 3.4), squeeze=False,
                                 layout="constrained")
        for ax, (g, t, rows), label in zip(axes[0], columns, labels):
            mean = torch.tensor([r["phi"] for _, r in rows]).mean(0)
            im = ax.imshow(mean.numpy(), aspect="auto", cmap="magma", vmin=0, vmax=1, origin="lower",
                           interpolation="nearest", extent=(0.5, mean.shape[1] + 0.5, 0.5, mean.shape[0] + 0.5))
            ax.set(title=f"{g}, {t}", xlabel="j (compared adapter)", ylabel="i")
            ax.title.set_fontsize(9)
        fig.colorbar(im, ax=axes[0].tolist())
        fig.suptitle("phi(i, j), mean over depth")
        paths.append(os.path.join(directory, "phi.png"))
        fig.savefig(paths[1], bbox_inches="tight")
        plt.close(fig)
    return paths


def add_arguments(p):
    p.add_argument("adapter", help="adapter folder (train.py's best/ or last/)")
    p.add_argument("--base", required=True, help="hub id or folder of the base model the adapter was trained on")
    p.add_argument("--compare", help="a second adapter on the same layers (another rank or seed): adds phi")
    p.add_argument("--json", action="store_true", help="print one JSON record per layer instead of the table")
    p.add_argument("--plot", metavar="DIR", help="write rel_norm.png (and phi.png with --compare); needs matplotlib")


def run(args):
    records, cfg, other = inspect(args.base, args.adapter, args.compare)
    if args.json:
        print("\n".join(json.dumps(r) for r in records))
    else:
        print(table(records, cfg, args.adapter, args.base, other, args.compare))
    if args.plot:
        for path in plot(records, args.plot):
            print(f"wrote {path}", file=sys.stderr)  # stdout stays the table or the JSON records

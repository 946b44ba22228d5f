"""What an adapter learned, per layer: the size, spectrum and direction of its update ΔW.

    python -m dialsum_raw.lora inspect RUN --base MODEL [--compare RUN2] [--targets q,v] [--rank R]
        [--intruder-k 10] [--intruder-eps 0.5] [--json] [--plot DIR]

RUN is an adapter folder, or a full fine-tune's model folder (a --lora-rank 0 run's best/ or last/), for which
ΔW = W_ft - W0 on the --targets layers (default: the compared adapter's, else q,v) and k = --rank (default:
the compared adapter's rank, else 8).

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
  E[phi(i, j)] = max(i, j) / n. When one side is a full fine-tune, phi compares the left-singular vectors (the
  output directions, where intruder dimensions live), and the compared run's intruder count stands beside;
- stable_rank, intruders, top_share, bottom_share: see dialsum_raw/spectra.py (intruders of the merged W + ΔW,
  "LoRA vs Full Fine-tuning: An Illusion of Equivalence"; the shares over W's k largest and k smallest
  directions).
"""

import json
import os
import re
import sys
from dataclasses import dataclass

import torch

from .. import spectra
from ..errors import UserError
from .adapter import ADAPTER_CONFIG, check_adapter, read_adapter, target_layers, updates

HELP = "per-layer norms, spectra, amplification and (with --compare) subspace similarity of an adapter"
KEYS = ("layer", "fro_norm", "rel_norm", "singular_values", "effective_rank", "amplification", "stable_rank",
        "intruders", "top_share", "bottom_share")
FULL_TARGETS, FULL_RANK = (
    ("q", "v"),
    8,
)  # a full fine-tune's defaults when no adapter is compared: the notebook's


@dataclass(frozen=True)
class FullFineTune:
    """What inspect reports for a full fine-tune in the place of an adapter's LoRAConfig."""
    targets: tuple
    rank: int

    def describe(self) -> str:
        return (f"full fine-tune, ΔW = W_ft - W0 on {','.join(self.targets)}, "
                f"rank-dependent figures at k = {self.rank}")


GROUPS = {
    "SelfAttention": "self-attention",
    "EncDecAttention": "cross-attention",
    "DenseReluDense": "feed-forward",
}


def effective_rank(singular_values: torch.Tensor) -> float:
    p = singular_values[singular_values > 0]
    if p.numel() == 0:
        return 0.0  # no update at all
    p = p / p.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def layer_stats(w: torch.Tensor, dw: torch.Tensor, k: int, intruder_k=spectra.INTRUDER_K,
                intruder_eps=spectra.INTRUDER_EPS) -> dict:
    """The per-layer figures for base weight w and update dw (both out x in), from dw's top-k singular
    triplets."""
    w, dw = w.double(), dw.double()
    u, s, vh = torch.linalg.svd(dw, full_matrices=False)
    fro = float(dw.norm())
    w_part = float((u[:, :k].T @ w @ vh[:k].T).norm())
    top, bottom = spectra.shares(w, dw, k)
    return {
        "fro_norm": fro,
        "rel_norm": fro / float(w.norm()),
        "singular_values": s[:k].tolist(),
        "effective_rank": effective_rank(s[:k]),
        "amplification": fro / w_part if fro else 0.0,
        "stable_rank": spectra.stable_rank(dw),
        "intruders": spectra.intruders(w, dw, intruder_k, intruder_eps),
        "top_share": top,
        "bottom_share": bottom,
    }


def subspace_similarity(a1: torch.Tensor, a2: torch.Tensor, k1=None, k2=None) -> torch.Tensor:
    """phi(i, j) for i <= k1, j <= k2 (default: all) over the right-singular vectors of a1 and a2, as a matrix
    whose [i-1, j-1] entry is phi(i, j)."""
    v1 = torch.linalg.svd(a1.double(), full_matrices=False).Vh[
        :k1
    ]  # rows: right-singular vectors, largest first
    v2 = torch.linalg.svd(a2.double(), full_matrices=False).Vh[:k2]
    overlap = ((v1 @ v2.T) ** 2).cumsum(0).cumsum(1)  # [i-1, j-1] = ||V1_i^T V2_j||_F^2
    i = torch.arange(1, len(v1) + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, len(v2) + 1, dtype=torch.float64)[None, :]
    return overlap / torch.minimum(i, j)


def adapter_updates(model, adapter):
    """(config, [(layer, W, ΔW, k)]) for an adapter on `model`'s original weights, in model order."""
    cfg, tensors = check_adapter(model, adapter)
    return cfg, [(name, model.get_submodule(name).weight.detach().double(), dw, k)
                 for name, dw, k in updates(model, cfg, tensors)]


def full_updates(model, folder, targets, rank):
    """[(layer, W0, W_ft - W0, rank)] on the `targets` layers of a full fine-tune's model folder, W0 from
    `model`."""
    from ..modeling import load_model
    tuned, out = load_model(folder), []
    for name in target_layers(model, targets):
        w = model.get_submodule(name).weight.detach().double()
        try:
            w_ft = tuned.get_submodule(name).weight.detach().double()
        except AttributeError:
            w_ft = None
        if w_ft is None or w_ft.shape != w.shape:
            raise UserError(
                f"{folder} does not fit this base model: its {name} is "
                f"{'missing' if w_ft is None else tuple(w_ft.shape)}, the base's {tuple(w.shape)}"
            )
        out.append((name, w, w_ft - w, rank))
    return out


def run_config(folder):
    """An adapter's LoRAConfig, or None for a model folder (a full fine-tune); anything else is a
    UserError."""
    if os.path.isfile(os.path.join(folder, ADAPTER_CONFIG)):
        return read_adapter(folder)[0]
    if os.path.isfile(os.path.join(folder, "config.json")):
        return None
    raise UserError(f"{folder}: neither an adapter ({ADAPTER_CONFIG}) nor a model folder (config.json)")


def inspect(base, adapter, compare=None, targets=None, rank=None, intruder_k=spectra.INTRUDER_K,
            intruder_eps=spectra.INTRUDER_EPS):
    """(records, config, config of the compared run or None), a config being a LoRAConfig or a FullFineTune.
    Each record has KEYS, plus 'phi' and 'compare_intruders' with compare. A full fine-tune takes `targets`
    and `rank`, else those of the adapter it is compared with."""
    from ..modeling import load_model
    cfgs = [run_config(f) for f in (adapter, compare) if f]
    known = next((c for c in cfgs if c), None)
    full = FullFineTune(tuple(targets or (known.targets if known else FULL_TARGETS)),
                        rank or (known.rank if known else FULL_RANK))
    cfgs = [c or full for c in cfgs]

    def updates(folder, cfg):
        if cfg is full:
            return full_updates(load_model(base), folder, full.targets, full.rank)
        return adapter_updates(load_model(base), folder)[1]

    mine = updates(adapter, cfgs[0])
    records = [{"layer": name, **layer_stats(w, dw, k, intruder_k, intruder_eps)} for name, w, dw, k in mine]
    if compare:
        theirs = {name: (w, dw, k) for name, w, dw, k in updates(compare, cfgs[1])}
        if theirs.keys() != {r["layer"] for r in records}:
            raise UserError(f"--compare {compare} changes other layers than {adapter}; compare runs with the "
                            "same targets (--targets for a full fine-tune)")
        left = full in cfgs  # a full fine-tune: compare output directions, as intruder dimensions do
        for record, (name, _, dw, k) in zip(records, mine):
            w2, dw2, k2 = theirs[name]
            record["phi"] = subspace_similarity(dw.T if left else dw, dw2.T if left else dw2, k, k2).tolist()
            record["compare_intruders"] = spectra.intruders(w2, dw2, intruder_k, intruder_eps)
    return records, cfgs[0], cfgs[1] if compare else None


def _place(layer):
    """('encoder self-attention', 'q', block) for a T5 layer name; other models fall back to the parent
    path."""
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


def table(records, cfg, adapter, base, other=None, compare=None, intruder_k=spectra.INTRUDER_K,
          intruder_eps=spectra.INTRUDER_EPS) -> str:
    lines = [f"run     {adapter}: {cfg.describe()}", f"base    {base}"]
    if other:
        lines.append(f"compare {compare}: {other.describe()}")
    head = (f"  {'target':<6} {'block':>5} {'fro_norm':>9} {'rel_norm':>9} {'eff_rank':>8} {'amplif':>7} "
            f"{'st_rank':>7} {'intr':>4} {'top':>5} {'bottom':>6}")
    head += f" {'phi(1,1)':>8} {'phi(r,r)':>8} {'intr2':>5}" if other else ""
    head += "  top singular values"
    for group, targets in grouped(records).items():
        lines += ["", group, head]
        for target, rows in targets.items():
            for block, r in rows:
                row = (f"  {target:<6} {block:>5} {r['fro_norm']:>9.3g} {r['rel_norm']:>9.3g} "
                       f"{r['effective_rank']:>8.2f} {r['amplification']:>7.3g} {r['stable_rank']:>7.2f} "
                       f"{r['intruders']:>4} {r['top_share']:>5.3f} {r['bottom_share']:>6.3f}")
                if other:
                    row += f" {r['phi'][0][0]:>8.3f} {r['phi'][-1][-1]:>8.3f} {r['compare_intruders']:>5}"
                lines.append(row + "  " + " ".join(f"{v:.3g}" for v in r["singular_values"][:4]))
    lines += [
        "",
        "rel_norm = ||ΔW||_F / ||W||_F; eff_rank = exp(entropy of the normalized singular values); "
        "amplif = ||ΔW||_F / ||U^T W V||_F (LoRA paper 7.3); st_rank = ||ΔW||_F^2 / ||ΔW||_2^2",
        f"intr = intruder dimensions: of the top {intruder_k} left-singular vectors of W + ΔW, those whose "
        "best "
        f"match |u . u0| among W's is below {intruder_eps:g}; top / bottom = the share of ||ΔW||_F^2 in W's "
        "k "
        "largest / smallest left-singular directions",
    ]
    if other:
        side = "left" if FullFineTune in (type(cfg), type(other)) else "right"
        lines.append(
            f"phi(i, j) = ||V1_i^T V2_j||_F^2 / min(i, j), V: {side}-singular vectors of each ΔW "
            "(LoRA paper 7.2); phi(r,r) at both full ranks; random subspaces give max(i, j) / n, "
            f"n = the layer's {'output' if side == 'left' else 'input'} size; intr2 = the compared run's intr"
        )
    return "\n".join(lines)


def plot(
    records, directory, runs=("run",), intruder_k=spectra.INTRUDER_K, intruder_eps=spectra.INTRUDER_EPS
) -> list:
    """rel_norm.png (depth x target heatmap), intruders.png (layers x runs: the inspected run and, with
    --compare, the compared one) and, with --compare, phi.png (phi grid, mean over depth)."""
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
    ax.set(
        xticks=range(len(columns)), yticks=range(depth), ylabel="block", title="rel_norm = ||ΔW||_F / ||W||_F"
    )
    ax.set_xticklabels(labels, fontsize=8)
    fig.colorbar(im, ax=ax)
    paths = [os.path.join(directory, "rel_norm.png")]
    fig.savefig(paths[0], bbox_inches="tight")
    plt.close(fig)
    counts = torch.tensor(
        [
            [r["intruders"], r["compare_intruders"]] if "compare_intruders" in r else [r["intruders"]]
            for r in records
        ]
    )
    fig, ax = plt.subplots(
        figsize=(2.5 + 1.8 * counts.shape[1], 0.22 * len(records) + 1.5), layout="constrained"
    )
    top = max(1, int(counts.max()))
    ax.imshow(counts.numpy(), aspect="auto", cmap="Reds", vmin=0, vmax=top, interpolation="nearest")
    for (i, j), n in zip(
        torch.cartesian_prod(torch.arange(counts.shape[0]), torch.arange(counts.shape[1])).tolist(),
        counts.flatten().tolist(),
    ):
        ax.text(j, i, str(n), ha="center", va="center", fontsize=7, color="white" if n > top / 2 else "black")
    ax.set(xticks=range(counts.shape[1]), yticks=range(len(records)),
           title=f"intruder dimensions (top {intruder_k}, eps {intruder_eps:g})")
    ax.set_xticklabels(
        [os.path.join(*os.path.normpath(str(run)).split(os.sep)[-2:]) for run in runs], fontsize=8
    )
    ax.set_yticklabels([" ".join(map(str, _place(r["layer"]))) for r in records], fontsize=7)
    paths.append(os.path.join(directory, "intruders.png"))
    fig.savefig(paths[-1], bbox_inches="tight")
    plt.close(fig)
    if "phi" in records[0]:
        fig, axes = plt.subplots(1, len(columns), figsize=(2.6 * len(columns) + 1, 3.4), squeeze=False,
                                 layout="constrained")
        for ax, (g, t, rows), label in zip(axes[0], columns, labels):
            mean = torch.tensor([r["phi"] for _, r in rows]).mean(0)
            im = ax.imshow(
                mean.numpy(),
                aspect="auto",
                cmap="magma",
                vmin=0,
                vmax=1,
                origin="lower",
                interpolation="nearest",
                extent=(0.5, mean.shape[1] + 0.5, 0.5, mean.shape[0] + 0.5),
            )
            ax.set(title=f"{g}, {t}", xlabel="j (compared adapter)", ylabel="i")
            ax.title.set_fontsize(9)
        fig.colorbar(im, ax=axes[0].tolist())
        fig.suptitle("phi(i, j), mean over depth")
        paths.append(os.path.join(directory, "phi.png"))
        fig.savefig(paths[-1], bbox_inches="tight")
        plt.close(fig)
    return paths


def add_arguments(p):
    p.add_argument(
        "adapter",
        metavar="RUN",
        help="an adapter folder, or a full fine-tune's model folder (train.py's best/ or last/)",
    )
    p.add_argument(
        "--base", required=True, help="hub id or folder of the base model the run was trained from"
    )
    p.add_argument(
        "--compare",
        metavar="RUN2",
        help="a second run on the same layers (another rank, seed, or a full "
        "fine-tune): adds phi and its intruder counts",
    )
    p.add_argument(
        "--targets",
        type=lambda text: tuple(t for t in text.split(",") if t),
        help="layers of a full fine-tune to inspect, e.g. q,k,v,o,wi,wo (default: the compared adapter's, "
        f"else {','.join(FULL_TARGETS)})",
    )
    p.add_argument(
        "--rank",
        type=int,
        help="k of the rank-dependent figures for a full fine-tune (default: the "
        f"compared adapter's rank, else {FULL_RANK})",
    )
    p.add_argument(
        "--intruder-k",
        type=int,
        default=spectra.INTRUDER_K,
        help=f"top singular vectors of W + ΔW searched for intruders (default {spectra.INTRUDER_K})",
    )
    p.add_argument("--intruder-eps", type=float, default=spectra.INTRUDER_EPS,
                   help=f"a vector is an intruder when its best match with W's is below this (default "
                        f"{spectra.INTRUDER_EPS})")
    p.add_argument("--json", action="store_true", help="print one JSON record per layer instead of the table")
    p.add_argument(
        "--plot",
        metavar="DIR",
        help="write rel_norm.png, intruders.png (and phi.png with --compare); needs matplotlib",
    )


def run(args):
    if args.rank is not None and args.rank < 1 or args.intruder_k < 1 or not 0 < args.intruder_eps <= 1:
        raise UserError(
            f"--rank and --intruder-k must be >= 1 and --intruder-eps in (0, 1], got {args.rank}, "
            f"{args.intruder_k}, {args.intruder_eps}"
        )
    intruder = {"intruder_k": args.intruder_k, "intruder_eps": args.intruder_eps}
    records, cfg, other = inspect(args.base, args.adapter, args.compare, args.targets, args.rank, **intruder)
    if args.json:
        print("\n".join(json.dumps(r) for r in records))
    else:
        print(table(records, cfg, args.adapter, args.base, other, args.compare, **intruder))
    if args.plot:
        runs = [args.adapter] + ([args.compare] if args.compare else [])
        for path in plot(records, args.plot, runs, **intruder):
            print(f"wrote {path}", file=sys.stderr)  # stdout stays the table or the JSON records

"""Pictures from the files runs and evaluations write; matplotlib is imported only here, only when drawing.

    python -m dialsum_raw.plot runs/lora runs/full --out curves.png   # training runs (metrics.jsonl)
    python -m dialsum_raw.plot runs/eval --out rouge.png              # an evaluation (metrics.json)

Training: loss (train and validation) against step and against tokens, the learning rate, and ROUGE
when the run logged it (--eval-rouge); several runs share one figure, one colour each.
Evaluation: each model's ROUGE with its 95% bootstrap interval as error bars, however many models it compared.
"""

import argparse
import json
import os
import sys

from .errors import UserError, run_cli
from .runlog import METRICS_FILE, read_metrics

INSTALL = 'matplotlib is not installed: pip install -e ".[plot]"'
ROUGE_LOGGED = ("rouge1", "rouge2", "rougeL")
ROUGE_MARKERS = {"rouge1": "o", "rouge2": "s", "rougeL": "^"}
CHART_KIND = "per_row"  # the notebook's figure


def _pyplot():
    """matplotlib's pyplot on a file-only backend, or a one-line install hint."""
    try:
        import matplotlib
    except ImportError:
        raise UserError(INSTALL) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def read_run(run, notes):
    """The lines of a run's metrics.jsonl (`run` is its folder or the file itself); damaged lines are skipped
    with a note in `notes`."""
    path = os.path.join(run, METRICS_FILE) if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise UserError(f"{run}: no {METRICS_FILE} (give a training run's output folder)")
    return read_metrics(path, notes)


def curves(runs, out):
    """runs: {label: metrics.jsonl lines}. Train lines carry "loss", validation lines "val_loss"."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    (by_step, by_tokens), (lr_ax, rouge_ax) = axes
    any_rouge = False
    for i, (label, lines) in enumerate(runs.items()):
        color = f"C{i % 10}"
        train = [m for m in lines if "loss" in m and "val_loss" not in m]
        val = [m for m in lines if "val_loss" in m]
        for ax, x in ((by_step, "step"), (by_tokens, "tokens")):
            ax.plot([m[x] for m in train], [m["loss"] for m in train], color=color, label=f"{label} train")
            ax.plot([m[x] for m in val], [m["val_loss"] for m in val], color=color, ls="--", marker=".",
                    label=f"{label} validation")
        lr = {m["step"]: m["lr"] for m in lines if "lr" in m}  # train and validation lines may share a step
        lr_ax.plot(list(lr), list(lr.values()), color=color, label=label)
        for k in ROUGE_LOGGED:
            logged = [m for m in val if k in m]
            if logged:
                any_rouge = True
                rouge_ax.plot([m["step"] for m in logged], [100 * m[k] for m in logged], color=color,
                              marker=ROUGE_MARKERS[k], label=f"{label} {k}")
    for ax, xlabel, ylabel in (
        (by_step, "optimizer step", "loss (per target token)"),
        (by_tokens, "tokens seen (source + target, no padding)", "loss (per target token)"),
        (lr_ax, "optimizer step", "learning rate"),
        (rouge_ax, "optimizer step", "validation ROUGE F1 (%)"),
    ):
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    if not any_rouge:
        rouge_ax.text(0.5, 0.5, "no ROUGE logged\n(train with --eval-rouge N)", ha="center", va="center",
                      transform=rouge_ax.transAxes, color="gray")
    _save(fig, plt, out)


def rouge_chart(evaluation, out):
    """evaluation: a metrics.json from evaluate.py. Bars per model and rouge type, intervals as error bars."""
    if "intervals" not in evaluation:
        raise UserError(
            "this metrics.json has no bootstrap intervals (written by an older evaluate.py): rerun it"
        )
    plt = _pyplot()
    ci = evaluation["intervals"]
    names = [n for n in evaluation if n not in ("meta", "intervals")]
    types = list(evaluation[names[0]][CHART_KIND])
    fig, ax = plt.subplots(figsize=(max(8, 2 + 0.3 * len(names) * len(types)), 4.5))
    width = 0.8 / len(names)
    colours = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    for i, name in enumerate(names):
        mean = [100 * evaluation[name][CHART_KIND][k] for k in types]
        low, high = zip(*(ci["models"][name][CHART_KIND][k] for k in types))
        err = [[m - 100 * lo for m, lo in zip(mean, low)], [100 * hi - m for m, hi in zip(mean, high)]]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(types))]
        ax.bar(xs, mean, width, yerr=err, capsize=3, label=name, color=colours(i % colours.N))
        for x, m, hi in zip(xs, mean, high):  # above the error bar, readable however short the bar
            ax.text(x, 100 * hi, f"{m:.1f}", ha="center", va="bottom", fontsize="x-small")
    ax.set_xticks(range(len(types)), types)
    ax.set_ylabel("ROUGE F1 (%), mean over reference rows")
    ax.set_title(
        f"{evaluation['meta']['split']} split, {evaluation['meta']['dialogues']} dialogues; error bars: "
        f"{100 * ci['level']:.0f}% bootstrap intervals ({ci['resamples']:,} resamples)",
        fontsize="small",
    )
    ax.set_ylim(0, 1.1 * ax.get_ylim()[1])
    # below the axes, as many names a row as fit the figure's width (sweep points have long names)
    per_row = max(1, min(len(names), int(fig.get_figwidth() * 12) // (max(map(len, names)) + 5)))
    ax.legend(ncol=per_row, loc="upper center", bbox_to_anchor=(0.5, -0.08), fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    _save(fig, plt, out)


def _save(fig, plt, out):
    fig.tight_layout()
    fig.savefig(out, dpi=100, bbox_inches="tight")  # a legend outside the axes stays in the picture
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m dialsum_raw.plot",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="training output folders, or one evaluation folder")
    p.add_argument("--out", required=True, help="the picture to write (.png, .svg, .pdf)")
    a = p.parse_args(argv)
    evaluation = os.path.join(a.runs[0], "metrics.json")
    if os.path.isfile(evaluation) and not os.path.isfile(os.path.join(a.runs[0], "metrics.jsonl")):
        if len(a.runs) > 1:
            raise UserError(f"{a.runs[0]} is an evaluation: give it alone")
        with open(evaluation) as f:
            rouge_chart(json.load(f), a.out)
    else:
        notes = []
        lines = {os.path.normpath(r): read_run(r, notes) for r in a.runs}
        for note in notes:
            print(note, file=sys.stderr)
        curves(lines, a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    run_cli(main)

"""One table over finished training runs, for comparing settings and seeds; it reads their files only.

    python -m dialsum_raw.runs RUN_DIR ... [--csv FILE] [--plot FILE]

A row per run: its folder, every setting that differs between the runs given, best_metric, best_value and
best_step (summary.json), the final val_loss and ROUGE (metrics.jsonl's last validation line), tokens/s and
wall_s (summary.json: tokens per second of the loop, and the loop's seconds summed over resumes), and, when
`sweep --evaluate` scored the run, its ROUGE on that split (evaluation.json: test_rouge1, ..., the mean over
reference rows, from the evaluation's report).
Runs whose settings differ only in seed form a group: its mean ± sample std (n - 1) and n are printed under
the table, and written into --csv beside the per-run rows (run = "mean" or "std"), every row naming its group.
A folder holding runs (a sweep's output) stands for the runs inside it. A folder that is not a run, or a run
that has not finished, gets a one-line note on stderr and is left out.
"""

import argparse
import csv
import json
import math
import os
import statistics
import sys

from .config import SETTINGS_FILE, Settings, normalize, read_run_settings
from .errors import UserError, first_line, run_cli
from .plot import _pyplot, _save, read_run

SUMMARY_FILE = "summary.json"  # what training.py writes into a run folder, beside SETTINGS_FILE
NOT_COMPARED = {"output_dir", "resume", "overwrite"}  # differ between any two runs, or say nothing about them
EVALUATION_FILE = "evaluation.json"  # what sweep --evaluate writes into a run folder: its ROUGE on a split
ROUGE = ("rouge1", "rouge2", "rougeL")
EVALUATED = tuple(f"{split}_{k}" for split in ("test", "validation", "train") for k in ROUGE)
METRICS = ("best_value", "best_step", "val_loss", *ROUGE, *EVALUATED, "tokens/s", "wall_s")


def find_runs(paths):
    """(run folders, notes): each path that is a run, or the runs found below a folder that holds some."""
    runs, notes = [], []
    for path in paths:
        if not os.path.isdir(path):
            notes.append(f"{path}: not a folder; skipped")
        elif os.path.isfile(os.path.join(path, SETTINGS_FILE)):
            runs.append(path)
        else:
            inside = []
            for folder, subs, files in os.walk(path):
                subs.sort()
                if SETTINGS_FILE in files:
                    inside.append(folder)
                    subs.clear()  # a run's own folders (last/, best/) hold no runs
            runs += inside
            if not inside:
                notes.append(f"{path}: not a training run (no {SETTINGS_FILE}) and holds none; skipped")
    return runs, notes


def read(run, notes):
    """A finished run as {"settings": {field: value}, "summary": {...}, "lines": metrics.jsonl}, or None
    when it is left out; every reason (a run left out, a damaged line skipped) goes into `notes`."""
    try:
        settings = Settings(**read_run_settings(os.path.join(run, SETTINGS_FILE)))
    except UserError as e:
        notes.append(f"{run}: unreadable {SETTINGS_FILE} ({e}); skipped")
        return None
    normalize(settings)  # a run saved before --lora-variant existed says dora = true
    try:
        lines = read_run(run, notes)
    except UserError:
        lines = []
    path = os.path.join(run, SUMMARY_FILE)
    if not os.path.exists(path):
        step = lines[-1]["step"] if lines else 0
        notes.append(f"{run}: not finished (no {SUMMARY_FILE}; logged up to step {step}): still running, or "
                     f"interrupted (continue it with: python train.py --resume {run}); skipped")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
        why = None if isinstance(summary, dict) else f"expected a JSON object, got {json.dumps(summary)[:40]}"
    except (OSError, ValueError) as e:
        why = first_line(e)
    if why:
        notes.append(f"{path}: damaged ({why}); skipped")
        return None
    return {
        "settings": vars(settings),
        "summary": summary,
        "lines": lines,
        "evaluated": evaluated(run, notes),
    }


def evaluated(run, notes):
    """{split_rougeN: value} of the run's evaluation.json ({} without one; a damaged one is a note)."""
    path = os.path.join(run, EVALUATION_FILE)
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        return {f"{saved['split']}_{k}": float(saved["rouge"][k]) for k in ROUGE}
    except (OSError, ValueError, KeyError, TypeError) as e:
        notes.append(f"{path}: damaged ({first_line(e)}); its ROUGE is left out")
        return {}


def row(run, record, keys):
    """The table's fields for one run: its folder, the settings `keys`, then METRICS (None when absent)."""
    summary = record["summary"]
    val = [m for m in record["lines"] if "val_loss" in m]
    last = val[-1] if val else {}
    return {
        "run": run,
        **{k: record["settings"][k] for k in keys},
        "best_metric": summary.get("best_metric"),
        "best_value": summary.get("best_value"),
        "best_step": summary.get("best_step"),
        "val_loss": last.get("val_loss"),
        **{k: last.get(k) for k in ROUGE},
        **{k: record["evaluated"].get(k) for k in EVALUATED},
        "tokens/s": summary.get("tokens_per_second"),
        "wall_s": summary.get("seconds"),
    }


def differing(records):
    """Settings that are not the same in every run, in Settings order."""
    keys = [k for k in records[0]["settings"] if k not in NOT_COMPARED]
    return [k for k in keys if len({repr(r["settings"][k]) for r in records}) > 1]


def group_of(r, keys):
    """A run's group: its differing settings other than seed, as key=value (or "all" when only seed
    differs)."""
    return ",".join(f"{k}={_text(r[k])}" for k in keys if k != "seed") or "all"


def summarize_groups(rows, seeds):
    """{group: {"n": runs, "seeds": distinct seeds, metric: (mean, sample std or None, runs that have it)}}
    over the groups' rows, in order of appearance; `seeds` gives each run's seed."""
    members = {}
    for r in rows:
        members.setdefault(r["group"], []).append(r)
    out = {}
    for name, rs in members.items():
        out[name] = {"n": len(rs), "seeds": len({seeds[r["run"]] for r in rs})}
        for m in METRICS:
            values = [r[m] for r in rs if isinstance(r[m], (int, float))]
            if values:
                out[name][m] = (
                    statistics.fmean(values),
                    statistics.stdev(values) if len(values) > 1 else None,
                    len(values),
                )
    return out


def repeated_seeds(rows, seeds):
    """Notes on groups whose runs share a seed: the same training twice (a sweep rerun under a new folder
    name, a copied folder), which n and the std would count as independent."""
    notes, first = [], {}
    for r in rows:
        twin = first.setdefault((r["group"], seeds[r["run"]]), r["run"])
        if twin != r["run"]:
            notes.append(f"group {r['group']}: {twin} and {r['run']} share seed {seeds[r['run']]}: the same "
                         "training twice? Its n and std count them as independent runs")
    return notes


def _text(v, metric=None):
    """A cell: lists joined by +, numbers to 4 significant digits (tokens/s whole, with thousands commas)."""
    if isinstance(v, (list, tuple)):
        return "+".join(map(str, v))
    if isinstance(v, float) and metric == "tokens/s":
        return f"{v:,.0f}"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return "-" if v is None else str(v)


def _mean_std(stats, metric, n):
    """mean ± std, and (n=K) when only K of the group's n runs have the metric."""
    if stats is None:
        return "-"
    mean, std, k = stats
    return (_text(mean, metric) + (f" ± {_text(std, metric)}" if std is not None else "")
            + (f" (n={k})" if k < n else ""))


def render(table):
    """Columns padded to their widest cell; the first column left-aligned, the rest right-aligned."""
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(line, widths))).rstrip() for line in table)


def columns(rows):
    """Metric columns present in at least one row (ROUGE only when some run logged it)."""
    return [m for m in METRICS if any(r[m] is not None for r in rows)]


def text_table(rows, keys, groups):
    shown = columns(rows)
    head = ["run", *keys, "best_metric", *shown]
    body = [[r["run"], *(_text(r[k]) for k in keys), _text(r["best_metric"]),
             *(_text(r[m], m) for m in shown)] for r in rows]
    out = render([head, *body])
    if any(g["n"] > 1 for g in groups.values()):
        out += ("\n\nruns that differ only in seed, as mean ± sample std over n:\n"
                + render([["group", "n", *shown],
                          *([name, _n(g), *(_mean_std(g.get(m), m, g["n"]) for m in shown)]
                            for name, g in groups.items())]))
    return out


def _n(group):
    """A group's n, with its distinct seeds when fewer (runs that share a seed: see repeated_seeds)."""
    return str(group["n"]) + (f" ({group['seeds']} seeds)" if group["seeds"] < group["n"] else "")


def write_csv(path, rows, keys, groups):
    """Per-run rows, then each group's mean and std rows (with the group's settings); every row names its
    group."""
    head = ["group", "run", "n", *keys, "best_metric", *METRICS]
    lines = [{**r, "n": 1} for r in rows]
    for name, g in groups.items():
        shared = next(
            {k: r[k] for k in (*keys, "best_metric") if k != "seed"} for r in rows if r["group"] == name
        )
        for i, label in enumerate(("mean", "std")):
            lines.append({"group": name, "run": label, "n": g["n"], **shared,
                          **{m: g[m][i] for m in METRICS if m in g and g[m][i] is not None}})
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, head, extrasaction="ignore")
        w.writeheader()
        for line in lines:
            w.writerow({k: "+".join(v) if isinstance(v, tuple) else v for k, v in line.items()})
    os.replace(tmp, path)


def plot_val_loss(rows, records, out):
    """Validation loss against step, a line per run, one colour per group (named once in the legend)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    colours = {}
    for r in rows:
        val = [m for m in records[r["run"]]["lines"] if "val_loss" in m]
        first = r["group"] not in colours
        colour = colours.setdefault(r["group"], f"C{len(colours) % 10}")
        n = sum(other["group"] == r["group"] for other in rows)
        ax.plot([m["step"] for m in val], [m["val_loss"] for m in val], color=colour, marker=".", alpha=0.8,
                label=f"{r['group']} (n={n})" if first else None)
    ax.set(xlabel="optimizer step", ylabel="validation loss (per target token)",
           title="validation loss, one line per run, one colour per group")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, plt, out)


def collect(paths):
    """(rows, differing setting names, groups, notes, {run: record}) for the runs under `paths`."""
    runs, notes = find_runs(paths)
    records = {}
    for run in runs:
        record = read(run, notes)
        if record is not None:
            records[run] = record
    if not records:
        return [], [], {}, notes, records
    keys = differing(list(records.values()))
    rows = [row(run, rec, keys) for run, rec in records.items()]
    for r in rows:
        r["group"] = group_of(r, keys)
    seeds = {run: rec["settings"]["seed"] for run, rec in records.items()}
    notes += repeated_seeds(rows, seeds)
    return rows, keys, summarize_groups(rows, seeds), notes, records


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m dialsum_raw.runs",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="training output folders, or folders holding them"
    )
    p.add_argument(
        "--csv", metavar="FILE", help="also write the rows and the groups' mean and std rows as CSV"
    )
    p.add_argument(
        "--plot", metavar="FILE", help="validation loss against step, coloured by group (needs matplotlib)"
    )
    a = p.parse_args(argv)
    rows, keys, groups, notes, records = collect(a.runs)
    for note in notes:
        print(note, file=sys.stderr)
    if not rows:
        raise UserError("no finished training run among " + ", ".join(a.runs))
    print(text_table(rows, keys, groups))
    if a.csv:
        write_csv(a.csv, rows, keys, groups)
        print(f"wrote {a.csv}", file=sys.stderr)
    if a.plot:
        plot_val_loss(rows, records, a.plot)
        print(f"wrote {a.plot}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)

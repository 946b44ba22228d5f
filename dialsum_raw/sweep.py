"""A grid of ordinary training runs from one file: one train.py run folder per point, resumable.

    python -m dialsum_raw.sweep SWEEP.toml [--dry-run] [--jobs N] [--evaluate [--split test] [--limit N]]

A sweep file (see configs/sweep-*.toml):

    name = "lora-variants"          # the runs go to OUT/<name>/<key=value,...> (default: the file's name)
    out = "runs/sweeps"             # OUT (the default)
    base = "notebook-lora.toml"     # optional: a config file, relative to the sweep file
    [settings]                      # optional: settings for every point, over the base
    max_steps = 100
    [[variant]]                     # optional: sets of settings, each crossed with the grid
    lora_rank = 8
    [[variant]]
    lora_rank = 0
    lr = 1e-4
    [grid]                          # every combination of these values
    seed = [1, 2, 3]

A point's settings are base < [settings] < its variant < its grid values, checked like a config file
before anything runs. A point's folder names the variant and grid settings in which it differs from base +
[settings] ("default" when none), so adding variants or values never renames a finished point; two points
that would train the same settings are refused. Each point's exact settings are written to
OUT/<name>/<point>.toml, and the point runs as `python train.py --config OUT/<name>/<point>.toml`. Run again,
the sweep skips a finished point (summary.json), continues an interrupted one with --resume, and starts the
others. It ends with the `python -m dialsum_raw.runs` table of its folder. --dry-run prints the commands the
sweep would run now, one per line, for a cluster scheduler (a SLURM job array runs line $SLURM_ARRAY_TASK_ID).

With --evaluate, once the points are done, every finished point's best/ is scored in ONE `evaluate.py` run
(its command is printed by --dry-run too): the base loaded once and its zero-shot summaries generated once,
adapters applied to it one after another, full fine-tunes loaded one at a time as --instruct models, each
named after its point ('=' written ':'). The report goes to OUT/<name>/eval-<split>[-first<N>]/, and each run
folder gets evaluation.json (its ROUGE there), which `runs` shows beside the validation figures. Run again, an
evaluation of the same points with the same settings is skipped; a point finished since re-runs the evaluation
of all of them (one report: its paired intervals need every model scored on the same dialogues in one run).
"""

import argparse
import dataclasses
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from . import runs
from .checkpoint import atomic_write, find
from .config import (SETTINGS_FILE, TRAIN, Settings, check_spellings, did_you_mean, fields_of, normalize,
                     read_config, read_run_settings, typed, validate)
from .errors import Stopped, UserError, run_cli

TRAIN_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")
EVALUATE_PY = os.path.join(os.path.dirname(TRAIN_PY), "evaluate.py")
EVALUATED = "evaluated.json"  # in an evaluation folder: the evaluate.py arguments of its finished run
SWEEP_KEYS = {"name", "out", "base", "settings", "variant", "grid"}
OWNED = {"output_dir", "resume", "overwrite"}  # the sweep sets these for every point


@dataclasses.dataclass
class Point:
    name: str       # key=value,... of its variant and grid values that differ from base + [settings]
    values: dict    # its settings, as a config file would give them
    out: str        # its run folder

    @property
    def config(self):
        return f"{self.out}.toml"


def _setting(path, table, key, value, each=False):
    """A sweep value checked as a config file's would be: a train.py setting, of its field's type; with
    each=True a non-empty list of such values (a grid axis)."""
    fields = {f.name: f for f in fields_of(TRAIN)}
    name = key.replace("-", "_")
    where = f"{path} [{table}]"
    if name in OWNED:
        raise UserError(f"{where}: {key} is set by the sweep for each point (OUT/<name>/<point>); remove it")
    if name not in fields:
        raise UserError(f"{where}: '{key}' is not a train.py setting{did_you_mean(name, fields, cutoff=0.4)}")
    if not each:
        return name, typed(where, key, value)
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: {key}: expected a non-empty list of values to try, got {value!r}")
    return name, [typed(where, key, v) for v in value]


def _label(value):
    """A value as it reads in a folder name: true, 0.0001, q+v."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return "+".join(map(str, value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).replace(os.sep, "_")


def load(path):
    """(sweep folder, [Point]) for a sweep file, every point checked; nothing is written."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError:
        raise UserError(f"sweep file not found: {path}")
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e})")
    unknown = sorted(set(raw) - SWEEP_KEYS)
    if unknown:
        raise UserError(
            f"{path}: unknown key '{unknown[0]}': a sweep file has {', '.join(sorted(SWEEP_KEYS))} "
            "(settings go under [settings], [[variant]] or [grid])"
        )
    name = raw.get("name", os.path.splitext(os.path.basename(path))[0])
    for key, value in (("name", name), ("out", raw.get("out", "")), ("base", raw.get("base", ""))):
        if not isinstance(value, str):
            raise UserError(f"{path}: {key}: expected a string, got {value!r}")
    for key, kind, what in (("settings", dict, "a table, [settings]"), ("grid", dict, "a table, [grid]"),
                            ("variant", list, "tables, [[variant]]")):
        value = raw.get(key, kind())
        if not isinstance(value, kind) or kind is list and not all(isinstance(v, dict) for v in value):
            raise UserError(f"{path}: {key}: expected {what}, got {value!r}")
    if not name.strip():
        raise UserError(
            f"{path}: name is empty: the points would land directly in {raw.get('out', 'runs/sweeps')}"
        )
    folder = os.path.join(raw.get("out", "runs/sweeps"), name)
    base = {}
    if "base" in raw:
        base = read_config(os.path.join(os.path.dirname(os.path.abspath(path)), raw["base"]))
    for table in (raw.get("settings", {}), *raw.get("variant", []), raw.get("grid", {})):
        check_spellings(path, table)
    common = dict(_setting(path, "settings", k, v) for k, v in raw.get("settings", {}).items())
    variants = [
        dict(_setting(path, "variant", k, v) for k, v in variant.items())
        for variant in raw.get("variant", [{}])
    ]
    grid = dict(_setting(path, "grid", k, v, each=True) for k, v in raw.get("grid", {}).items())
    owns = [
        {**variant, **dict(zip(grid, combo))}
        for variant in variants
        for combo in itertools.product(*grid.values())
    ]
    shared = _resolved({**base, **common})
    points, seen = {}, {}
    for own in owns:
        resolved = _resolved({**base, **common, **own})
        # named by its own settings only: adding points to a sweep never renames (and reruns) a finished one
        label = ",".join(f"{k}={_label(v)}" for k, v in own.items() if resolved[k] != shared[k]) or "default"
        same = seen.setdefault(repr(sorted(resolved.items())), label)
        if same != label:
            raise UserError(f"{path}: points {same} and {label} are the same training; remove one")
        if label in points:
            raise UserError(f"{path}: two points are both {label}; make the variants or values differ")
        out = os.path.join(folder, label)
        values = {**base, **common, **own, "output_dir": out}
        try:
            validate(Settings(**values))
        except UserError as e:
            raise UserError(f"{path}: point {label}: {e}")
        points[label] = Point(label, values, out)
    return folder, list(points.values())


def _resolved(values):
    """A point's settings as a run would see them (defaults filled in, --dora read as --lora-variant dora)."""
    settings = Settings(**values)
    normalize(settings)
    return vars(settings)


def write_config(point):
    """The point's settings as a config file train.py reads (the same writer as a run's settings.toml)."""
    from .training import save_settings
    save_settings(Settings(**point.values), point.config)


def plan(point):
    """(what, train.py arguments) for a point now: None for a finished run, --resume for one with a
    checkpoint."""
    check_same_settings(point)
    if os.path.isfile(os.path.join(point.out, runs.SUMMARY_FILE)):
        return "finished", None
    if find(os.path.join(point.out, "last")):
        return "resume", ["--resume", point.out]
    if os.path.isfile(os.path.join(point.out, SETTINGS_FILE)):  # killed before its first checkpoint
        return "restart", ["--config", point.config, "--overwrite"]
    return "start", ["--config", point.config]


def check_same_settings(point):
    """A run folder left by an earlier version of the sweep file is not continued as if it were this point."""
    saved = os.path.join(point.out, SETTINGS_FILE)
    if not os.path.isfile(saved):
        return
    old, new = Settings(**read_run_settings(saved)), Settings(**point.values)
    normalize(old)
    normalize(new)
    old, new = vars(old), vars(new)
    changed = [f"{k} {old[k]!r} -> {new[k]!r}" for k in new if k not in OWNED and old[k] != new[k]]
    if changed:
        raise UserError(
            f"{point.out} was run with other settings ({'; '.join(changed)}): the sweep file changed "
            "since; delete that folder or give the sweep another name"
        )


def command(args):
    return [sys.executable, TRAIN_PY, *args]


def execute(todo, jobs):
    """Run (point, train.py arguments) pairs, `jobs` at a time; returns [(point, exit code)] of those that
    failed. With jobs > 1 each point's output goes to OUT/<name>/<point>.log. SIGINT or SIGTERM is passed
    to the running points, which save last/ and stop; then the sweep stops."""
    running, failed, queue = [], [], list(todo)
    stop = {"signum": 0}

    def handler(signum, frame):
        stop["signum"] = signum
        for _, proc in running:
            proc.send_signal(signum)  # a point that also got it from the terminal takes both as one request

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while running or (queue and not stop["signum"]):
            while queue and len(running) < jobs and not stop["signum"]:
                point, args = queue.pop(0)
                print(f"sweep: {point.name}: train.py {' '.join(map(shlex.quote, args))}", file=sys.stderr)
                log = open(f"{point.out}.log", "a") if jobs > 1 else None
                running.append((point, subprocess.Popen(command(args), stdout=log, stderr=log)))
                if log:
                    log.close()  # the child holds its own copy
            time.sleep(0.2)
            for point, proc in [(pt, pr) for pt, pr in running if pr.poll() is not None]:
                running.remove((point, proc))
                if proc.returncode:
                    failed.append((point, proc.returncode))
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    if stop["signum"]:
        raise Stopped(f"sweep stopped by signal {stop['signum']}: run the same command again to continue it",
                      128 + stop["signum"])
    return failed


def finished(point):
    return os.path.isfile(os.path.join(point.out, runs.SUMMARY_FILE)) and os.path.isdir(
        os.path.join(point.out, "best")
    )


def model_name(point):
    """The point's name as evaluate.py's NAME (no '=', which separates NAME=DIR)."""
    return re.sub(r"[^A-Za-z0-9_.+,:-]", "_", point.name.replace("=", ":"))


def evaluation(folder, points, split, limit):
    """(evaluation folder, evaluate.py arguments) scoring the best/ of `points` in one run: adapters as
    --adapter NAME=DIR, full fine-tunes as --instruct NAME=DIR, on the base, data, source length and precision
    they trained with (one base and one data set for all of them)."""
    settings = [Settings(**p.values) for p in points]
    for key in ("model", "data"):
        values = sorted({str(getattr(s, key)) for s in settings})
        if len(values) > 1:
            raise UserError(
                f"--evaluate scores every point on one base and data set; these points have {key} "
                f"{' and '.join(values)}"
            )
    out = os.path.join(folder, f"eval-{split}" + (f"-first{limit}" if limit else ""))
    args = ["--base", settings[0].model, "--data", settings[0].data, "--split", split, "--output-dir", out,
            "--overwrite"] + (["--limit", str(limit)] if limit else [])
    for key in ("max_source_len", "precision"):
        values = {getattr(s, key) for s in settings}
        if len(values) == 1:
            args += ["--" + key.replace("_", "-"), str(values.pop())]
    for point, s in zip(points, settings):
        args += [
            "--adapter" if s.is_lora else "--instruct",
            f"{model_name(point)}={os.path.join(point.out, 'best')}",
        ]
    return out, args


def up_to_date(out, args):
    """Whether `out` holds a finished evaluation run with exactly these arguments."""
    try:
        with open(os.path.join(out, EVALUATED), encoding="utf-8") as f:
            return json.load(f).get("args") == args and os.path.isfile(os.path.join(out, "metrics.json"))
    except (OSError, ValueError, AttributeError):
        return False


def evaluate(folder, points, split, limit):
    """Score the finished points in one evaluate.py run (unless already done with the same arguments), then
    write each run's evaluation.json for `runs`."""
    out, args = evaluation(folder, points, split, limit)
    if up_to_date(out, args):
        print(f"sweep: {out} already evaluates these {len(points)} points with these settings; skipped",
              file=sys.stderr)
        return
    print(f"sweep: evaluate.py {' '.join(map(shlex.quote, args))}", file=sys.stderr)
    code = subprocess.run([sys.executable, EVALUATE_PY, *args], stdout=sys.stderr).returncode
    if code:
        raise UserError(f"the evaluation failed (exit {code}); its output is above")
    with open(os.path.join(out, "metrics.json"), encoding="utf-8") as f:
        scores = json.load(f)
    for point in points:
        atomic_write(
            os.path.join(point.out, runs.EVALUATION_FILE),
            json.dumps(
                {
                    "split": split,
                    "dialogues": scores["meta"]["dialogues"],
                    "report": os.path.join(out, "report.md"),
                    "model": model_name(point),
                    "rouge": scores[model_name(point)]["per_row"],
                },
                indent=2,
            )
            + "\n",
        )
    atomic_write(os.path.join(out, EVALUATED), json.dumps({"args": args}, indent=2) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m dialsum_raw.sweep",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("sweep", metavar="SWEEP.toml", help="the sweep file")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="write the points' settings files and print the train.py "
        "commands the sweep would run now, one per line",
    )
    p.add_argument("--jobs", type=int, default=1, help="points run at once (default 1)")
    p.add_argument("--evaluate", action="store_true", help="then score every finished point's best/ in one "
                                                            "evaluate.py run; `runs` shows its ROUGE")
    p.add_argument("--split", default="test", choices=("train", "validation", "test"),
                   help="--evaluate: the split scored (default test)")
    p.add_argument(
        "--limit", type=int, default=0, help="--evaluate: the first N dialogues only (default 0 = all)"
    )
    a = p.parse_args(argv)
    if a.jobs < 1 or a.limit < 0:
        raise UserError(f"--jobs must be >= 1 and --limit >= 0, got {a.jobs}, {a.limit}")
    if (a.split != "test" or a.limit) and not a.evaluate:
        raise UserError("--split and --limit choose what --evaluate scores: add --evaluate")
    if not os.path.isfile(TRAIN_PY):
        raise UserError(
            f"{TRAIN_PY} not found: run the sweep from a checkout of the project (pip install -e .)"
        )
    folder, points = load(a.sweep)
    os.makedirs(folder, exist_ok=True)
    todo = []
    for point in points:
        write_config(point)
        what, args = plan(point)
        print(f"{point.name}: {what}", file=sys.stderr)
        if args:
            todo.append((point, args))
    if a.dry_run:
        for _, args in todo:
            print(" ".join(map(shlex.quote, ["python", os.path.relpath(TRAIN_PY), *args])))
        out, args = evaluation(folder, points, a.split, a.limit) if a.evaluate else (None, None)
        if a.evaluate and not up_to_date(out, args):  # once every point has finished
            print(" ".join(map(shlex.quote, ["python", os.path.relpath(EVALUATE_PY), *args])))
        return
    failed = execute(todo, a.jobs)
    done = [point for point in points if finished(point)]
    if a.evaluate and done:
        evaluate(folder, done, a.split, a.limit)
    if len(failed) < len(points):
        runs.main([folder])
    if failed:
        raise UserError(
            f"{len(failed)} of {len(points)} points failed: "
            + "; ".join(
                f"{point.out} (exit {code}{'; see ' + point.out + '.log' if a.jobs > 1 else ''})"
                for point, code in failed
            )
        )


if __name__ == "__main__":
    run_cli(main)

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import CORPUS, REPO
from dialsum_raw import checkpoint, sweep
from dialsum_raw.config import read_config
from dialsum_raw.errors import UserError

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _sweep_file(tmp_path, tiny, out, grid='seed = [1, 2]', extra=""):
    """Two LoRA points (dropout on, so an exact resume also needs the RNG states) of a few steps each."""
    path = tmp_path / "sweep.toml"
    path.write_text(f'name = "t"\nout = "{out}"\nbase = "{REPO}/configs/tiny-smoke.toml"\n'
                    f'[settings]\nmodel = "{tiny}"\ndata = "{CORPUS}"\nsubsample = 40\nmax_source_len = 128\n'
                    'max_target_len = 32\nmax_steps = 8\neval_every = 4\nlog_every = 2\nprecision = "fp32"\n'
                    f'lora_rank = 4\nlora_dropout = 0.1\nlr = 1e-2\n{extra}[grid]\n{grid}\n')
    return str(path)


def _sweep(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "dialsum_raw.sweep", *args], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_sweep_killed_and_rerun_equals_uninterrupted(tiny, tmp_path):
    straight = _sweep(_sweep_file(tmp_path, tiny, tmp_path / "straight"), "--jobs", "2")
    (tmp_path / "k").mkdir()
    killed_file = _sweep_file(tmp_path / "k", tiny, tmp_path / "killed")
    killed = _sweep(killed_file, start_new_session=True)  # its own process group, to kill it with its runs
    second = tmp_path / "killed" / "t" / "seed=2"
    deadline = time.time() + 240
    while checkpoint.find(str(second / "last")) is None and time.time() < deadline and killed.poll() is None:
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert os.path.isfile(tmp_path / "killed" / "t" / "seed=1" / "summary.json"), (
        "the first point had finished"
    )
    assert not os.path.isfile(second / "summary.json"), "the second point must be killed mid-way"

    rerun = _sweep(killed_file)
    out, err = rerun.communicate()
    assert rerun.returncode == 0, err
    assert "seed=1: finished" in err and "seed=2: resume" in err
    assert (
        f"resumed from {second / 'last'} at step 4" in out
    )  # continued from its checkpoint, not started over
    out_straight, err_straight = straight.communicate()
    assert straight.returncode == 0, err_straight
    for point in ("seed=1", "seed=2"):
        a = load_file(tmp_path / "straight" / "t" / point / "last" / "adapter.safetensors")
        b = load_file(tmp_path / "killed" / "t" / point / "last" / "adapter.safetensors")
        assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
        assert read_config(tmp_path / "straight" / "t" / point / "settings.toml")["seed"] == int(point[-1])
    # the table at the end: both seeds in one group, n = 2, and the same validation losses
    for printed in (out, out_straight):
        assert any(line.split()[:2] == ["all", "2"] for line in printed.splitlines()), printed
    val = [[line.split()[5] for line in printed.splitlines() if line.startswith(str(tmp_path / name))]
           for printed, name in ((out, "killed"), (out_straight, "straight"))]
    assert val[0] == val[1] and val[0][0] != val[0][1]

    again = _sweep(killed_file, "--dry-run")  # everything finished: nothing left to run
    out, err = again.communicate()
    assert again.returncode == 0 and out == "" and err.count(": finished") == 2


@pytest.mark.slow
def test_dry_run_prints_one_train_command_per_point(tiny, tmp_path):
    path = _sweep_file(
        tmp_path, tiny, tmp_path / "out", grid='seed = [1, 2]\nlora_init = ["kaiming", "pissa"]'
    )
    res = subprocess.run([sys.executable, "-m", "dialsum_raw.sweep", path, "--dry-run"], cwd=REPO, env=ENV,
                         capture_output=True, text=True, check=True)
    folder = tmp_path / "out" / "t"
    names = [
        "seed=1",
        "seed=1,lora_init=pissa",
        "seed=2",
        "seed=2,lora_init=pissa",
    ]  # kaiming: the base's init
    assert res.stdout.splitlines() == [f"python train.py --config {folder / n}.toml" for n in names]
    assert sorted(os.listdir(folder)) == sorted(
        f"{n}.toml" for n in names
    )  # settings files only: nothing ran
    point = read_config(folder / "seed=2,lora_init=pissa.toml")
    assert (point["seed"], point["lora_init"], point["lora_rank"], point["output_dir"]) == (
        2, "pissa", 4, str(folder / "seed=2,lora_init=pissa"))


def test_shipped_sweeps_load():
    folder, points = sweep.load(os.path.join(REPO, "configs", "sweep-lora-variants.toml"))
    assert len(points) == 15 and len({p.out for p in points}) == 15
    full = [p.values for p in points if p.values["lora_rank"] == 0]
    assert sorted(v["seed"] for v in full) == [1, 2, 3]
    assert {(p.values["lora_rank"], p.values.get("rslora", False), p.values.get("lora_init", "kaiming"))
            for p in points} == {(8, False, "kaiming"), (64, False, "kaiming"), (64, True, "kaiming"),
                                 (8, False, "pissa"), (0, False, "kaiming")}
    notebook = read_config(os.path.join(REPO, "configs", "notebook-lora.toml"))
    assert all(
        p.values[k] == notebook[k] for p in points for k in ("data", "epochs", "warmup_ratio", "schedule")
    )
    folder, points = sweep.load(os.path.join(REPO, "configs", "sweep-tiny.toml"))
    assert sorted(p.values["lora_rank"] for p in points) == [0, 0, 8, 8]


@pytest.mark.parametrize(
    "grid, message",
    [
        (
            "lora_rnak = [4, 8]",
            r"\[grid\]: 'lora_rnak' is not a train.py setting; did you mean 'lora_rank'\?",
        ),
        ('output_dir = ["a"]', r"output_dir is set by the sweep"),
        ("seed = 3", r"seed: expected a non-empty list of values to try, got 3"),
        (
            'seed = [1, 2]\nlora_init = ["kaiming", "svd"]',
            r"point seed=1,lora_init=svd: --lora-init must be one of",
        ),
    ],
)
def test_bad_grid_is_a_user_error(tiny, tmp_path, grid, message):
    with pytest.raises(UserError, match=message):
        sweep.load(_sweep_file(tmp_path, tiny, tmp_path / "out", grid=grid))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key, value", [("lora_rank", "8.5"), ("rslora", '"yes"'), ("lora_targets", '"q,v"')])
def test_grid_value_of_wrong_type_reads_as_a_config_file_would(tiny, tmp_path, key, value):
    config = tmp_path / "c.toml"
    config.write_text(f"{key} = {value}\n")
    with pytest.raises(UserError) as from_config:
        read_config(str(config))
    path = _sweep_file(tmp_path, tiny, tmp_path / "out", grid=f"{key} = [{value}]")
    with pytest.raises(UserError) as from_sweep:
        sweep.load(path)
    assert str(from_config.value) == f"{config}: " + str(from_sweep.value).split(": ", 1)[1]
    assert str(from_sweep.value).startswith(f"{path} [grid]: {key}: expected")


def test_a_variant_written_as_one_table_is_a_user_error(tiny, tmp_path):
    """[variant] (one table) instead of [[variant]] (a list of them): one line, not an AttributeError."""
    path = _sweep_file(tmp_path, tiny, tmp_path / "out", extra='[variant]\nlora_rank = 8\n')
    with pytest.raises(UserError, match=r"variant: expected tables, \[\[variant\]\], got \{'lora_rank': 8\}"):
        sweep.load(path)


def test_adding_points_never_renames_a_finished_one(tiny, tmp_path):
    """Two variants appended to a seed = [1, 2] sweep, one of them the base's own settings: the points that
    were there keep their folders (no retraining), the new ones get their own."""
    before = {p.name: p.out for p in sweep.load(_sweep_file(tmp_path, tiny, tmp_path / "out"))[1]}
    assert sorted(before) == ["seed=1", "seed=2"]
    after = sweep.load(_sweep_file(tmp_path, tiny, tmp_path / "out",
                                   extra="[[variant]]\nlora_rank = 4\n[[variant]]\nlora_rank = 8\n"))[1]
    after = {p.name: p.out for p in after}
    assert after == {**before, "lora_rank=8,seed=1": str(tmp_path / "out" / "t" / "lora_rank=8,seed=1"),
                     "lora_rank=8,seed=2": str(tmp_path / "out" / "t" / "lora_rank=8,seed=2")}


@pytest.mark.parametrize("extra, grid, message", [
    ("", "seed = [1, 1]", r"two points are both seed=1"),
    ('[[variant]]\ndora = true\n[[variant]]\nlora_variant = "dora"\n', "seed = [1]",
     r"points dora=true,seed=1 and lora_variant=dora,seed=1 are the same training; remove one"),
])
def test_two_points_of_the_same_training_are_refused(tiny, tmp_path, extra, grid, message):
    with pytest.raises(UserError, match=message):
        sweep.load(_sweep_file(tmp_path, tiny, tmp_path / "out", grid=grid, extra=extra))


def test_an_empty_sweep_name_is_refused(tiny, tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(
        Path(_sweep_file(tmp_path, tiny, tmp_path / "out")).read_text().replace('name = "t"', 'name = ""')
    )
    with pytest.raises(UserError, match="name is empty"):
        sweep.load(str(path))


@pytest.mark.slow
def test_evaluate_scores_every_finished_point_in_one_run_and_a_rerun_skips_it(tiny, tmp_path):
    path = _sweep_file(tmp_path, tiny, tmp_path / "out", grid="lora_rank = [0, 4]\nseed = [1]")
    res = subprocess.run(
        [sys.executable, "-m", "dialsum_raw.sweep", path, "--jobs", "2", "--evaluate", "--limit", "2"],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    head = res.stdout.splitlines()[0].split()
    assert head[-5:] == ["test_rouge1", "test_rouge2", "test_rougeL", "tokens/s", "wall_s"]
    out = tmp_path / "out" / "t" / "eval-test-first2"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["meta"]["models"] == {
        "original": tiny,
        "lora_rank:0,seed:1": str(tmp_path / "out/t/lora_rank=0,seed=1/best"),
        "seed:1": f"{tiny} + {tmp_path / 'out/t/seed=1/best'}",
    }
    assert metrics["meta"]["dialogues"] == 2 and metrics["meta"]["reference"] == "seed:1"
    saved = json.loads((tmp_path / "out/t/seed=1" / "evaluation.json").read_text())
    assert saved["rouge"] == metrics["seed:1"]["per_row"] and saved["split"] == "test"
    row = next(
        line.split() for line in res.stdout.splitlines() if line.startswith(str(tmp_path / "out/t/seed=1"))
    )
    assert row[head.index("test_rouge1")] == f"{saved['rouge']['rouge1']:.4g}"
    written = (out / "metrics.json").stat().st_mtime_ns
    again = subprocess.run(
        [sys.executable, "-m", "dialsum_raw.sweep", path, "--evaluate", "--limit", "2"],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert (
        again.returncode == 0
        and "already evaluates these 2 points with these settings; skipped" in again.stderr
    )
    assert (out / "metrics.json").stat().st_mtime_ns == written
    dry = subprocess.run(
        [sys.executable, "-m", "dialsum_raw.sweep", path, "--evaluate", "--limit", "3", "--dry-run"],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert dry.stdout.splitlines() == [
        f"python evaluate.py --base {tiny} --data {CORPUS} --split test --output-dir "
        f"{tmp_path}/out/t/eval-test-first3 "
        f"--overwrite --limit 3 --max-source-len 128 --precision fp32 --instruct "
        f"lora_rank:0,seed:1={tmp_path}/out/t/lora_rank=0,seed=1/best --adapter "
        f"seed:1={tmp_path}/out/t/seed=1/best"
    ]

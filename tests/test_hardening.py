"""Issue 29: silent wrong results, unresumable runs and tracebacks an adversarial review found, each held
here by a test that failed before its fix."""

import json
import re
import shutil
import types
from pathlib import Path

import pytest
from conftest import CORPUS, metric_lines, train_cmd
from test_failures import EVAL, SMOKE, TRAIN, _fails
from test_sweep import _sweep_file

from dialsum_raw import training


def test_resume_trims_a_log_with_blank_and_damaged_lines(tmp_path):
    """A blank line (a hand edit, a copy) and a line a crash cut short: the resume's trim drops them with a
    note naming the line, and keeps every good line up to the checkpoint's step."""
    lines = [{"step": 2, "loss": 1.0}, {"step": 4, "loss": 0.5}, {"step": 6, "loss": 0.25}]
    log = tmp_path / "metrics.jsonl"
    log.write_text(
        json.dumps(lines[0]) + "\n\n" + json.dumps(lines[1]) + "\n" + json.dumps(lines[2]) + '\n{"st'
    )
    said = []
    run = types.SimpleNamespace(out=str(tmp_path), progress=training.Progress(step=4), log=said.append)
    training.trim_metrics(run)
    assert log.read_text() == "".join(json.dumps(m) + "\n" for m in lines[:2])
    assert said == [f"{log} line 5: damaged (not a JSON object with a step: '{{\"st'); skipped"]


def _adapter(tiny, folder, **cfg):
    """An adapter folder of the tiny model, as training saves it."""
    from dialsum_raw import lora
    from dialsum_raw.modeling import load_model
    model = load_model(tiny).eval()
    lora.inject(model, lora.LoRAConfig(**{"targets": ("q", "v"), "rank": 4, **cfg}))
    lora.save_adapter(model, folder, base_model="tiny")
    return folder / "adapter.json"


@pytest.mark.parametrize(
    "cfg, edit, message",
    [
        (
            {"alpha": 64.0},
            {"alpha": None},
            "adapter field 'alpha' is missing: format dialsum_raw-lora/3 holds every field",
        ),
        ({"variant": "dora"}, {"variant": None}, "adapter field 'variant' is missing"),
        ({"init": "gaussian"}, {"init": None}, "adapter field 'init' is missing"),
        ({}, {"rank": 4.0}, "adapter rank must be an integer, got 4.0"),
        ({}, {"rslora": 1}, "adapter rslora must be true or false, got 1"),
        ({}, {"alpha": True}, "adapter alpha must be a number, got True"),
        ({}, {"scale": 2}, "adapter field 'scale' is not one of targets, rank"),
    ],
)
def test_an_adapter_json_missing_or_mistyping_a_field_is_the_adapters_fault(
    tiny, tmp_path, cfg, edit, message
):
    """Format 2 holds every field that changes the computation: a default would run an alpha-64 adapter at
    alpha 16 (logits off by 3.81), a missing variant read as "does not fit this base model"."""
    from dialsum_raw import lora
    from dialsum_raw.errors import UserError
    from dialsum_raw.modeling import load_model
    path = _adapter(tiny, tmp_path / "ad", **cfg)
    saved = {**json.loads(path.read_text()), **edit}
    path.write_text(json.dumps({k: v for k, v in saved.items() if v is not None}))
    with pytest.raises(UserError) as e:
        lora.load_adapter(load_model(tiny), tmp_path / "ad")
    assert str(e.value).startswith(f"{path}: {message}") and "\n" not in str(e.value)


def test_a_format_1_adapter_keeps_its_documented_defaults(tiny, tmp_path):
    """Format 1 (before LoRAConfig) wrote no alpha when it was the default 16: it still loads so."""
    from dialsum_raw import lora
    path = _adapter(tiny, tmp_path / "ad", alpha=16.0)
    path.write_text(json.dumps({"format": "dialsum_raw-lora/1", "rank": 4, "targets": ["q", "v"]}))
    cfg, _, _ = lora.read_adapter(tmp_path / "ad")
    assert (cfg.alpha, cfg.dropout, cfg.rslora, cfg.variant, cfg.init) == (
        16.0,
        0.0,
        False,
        "lora",
        "kaiming",
    )


def test_a_format_2_adapter_loads_on_an_fp32_base_and_a_format_3_one_must_name_its_base(tiny, tmp_path):
    """Format 2 (the previous release) held every field of its day: its adapters load, with the fp32 base they
    were trained on; since format 3 the base dtype is one of the fields a default must not fill in."""
    from dialsum_raw import lora
    from dialsum_raw.errors import UserError
    from dialsum_raw.modeling import load_model
    path = _adapter(tiny, tmp_path / "ad", alpha=64.0)
    saved = json.loads(path.read_text())
    old = {k: v for k, v in saved.items() if k not in ("base_dtype", "loftq_iter")}
    path.write_text(json.dumps({**old, "format": "dialsum_raw-lora/2"}))
    cfg, _, _ = lora.read_adapter(tmp_path / "ad")
    assert (cfg.alpha, cfg.base_dtype, cfg.loftq_iter) == (64.0, "fp32", 1)
    path.write_text(json.dumps({**old, "format": "dialsum_raw-lora/3"}))
    with pytest.raises(UserError, match="adapter field 'base_dtype' is missing: format dialsum_raw-lora/3"):
        lora.load_adapter(load_model(tiny), tmp_path / "ad")


def _data_with(tmp_path, **files):
    """A DialogSum folder: the real files, with the ones named here replaced by the text given."""
    folder = tmp_path / "data"
    shutil.copytree(CORPUS, folder)
    for name, text in files.items():
        (folder / f"dialogsum.{name}.jsonl").write_text(text)
    return folder


@pytest.mark.parametrize("name, split, text", [("dev", "validation", ""), ("train", "train", "\n\n  \n")])
def test_an_empty_split_is_refused_naming_file_and_split(tmp_path, name, split, text):
    from dialsum_raw import data
    from dialsum_raw.errors import UserError
    folder = _data_with(tmp_path, **{name: text})
    with pytest.raises(
        UserError, match=f"^{folder / f'dialogsum.{name}.jsonl'}: the '{split}' split holds no dialogue"
    ):
        data.load_splits(str(folder), (split,))


@pytest.mark.slow
def test_evaluate_and_train_on_an_empty_split_exit_2_in_one_line(tiny, tmp_path):
    """evaluate.py --split validation on an empty file used to write ROUGE 0.00 and exit 0; train.py on blank
    lines ended in an IndexError inside the tokenizer."""
    folder = _data_with(tmp_path, dev="", train="\n\n")
    _fails(
        [
            EVAL,
            "--base",
            tiny,
            "--data",
            str(folder),
            "--split",
            "validation",
            "--output-dir",
            str(tmp_path / "e"),
        ],
        f"{folder / 'dialogsum.dev.jsonl'}: the 'validation' split holds no dialogue",
    )
    assert not (tmp_path / "e" / "report.md").exists()
    _fails(
        [
            TRAIN,
            "--config",
            SMOKE,
            "--model",
            tiny,
            "--data",
            str(folder),
            "--output-dir",
            str(tmp_path / "t"),
        ],
        f"{folder / 'dialogsum.train.jsonl'}: the 'train' split holds no dialogue",
    )


def test_non_finite_settings_are_written_as_toml_or_refused(tmp_path):
    """--clip inf wrote `clip = Infinity` (JSON), which --resume and runs could not read back; inf or nan
    where it makes no sense is refused before any work."""
    from dialsum_raw.config import Settings, read_run_settings, validate
    from dialsum_raw.errors import UserError
    s = Settings(clip=float("inf"))
    validate(s)
    training.save_settings(s, tmp_path / "settings.toml")
    assert "clip = inf\n" in (tmp_path / "settings.toml").read_text()
    assert read_run_settings(tmp_path / "settings.toml")["clip"] == float("inf")
    assert training.toml_value(float("nan")) == "nan" and training.toml_value(float("-inf")) == "-inf"
    for name, flag in (("lr", "--lr"), ("lora_plus_ratio", "--lora-plus-ratio"), ("epochs", "--epochs"),
                       ("lora_alpha", "--lora-alpha"), ("length_penalty", "--length-penalty")):
        for value in (float("inf"), float("nan")):
            with pytest.raises(UserError, match=f"^{flag} must be a finite number, got {value}$"):
                validate(Settings(**{name: value}))


def test_a_sweep_grid_of_inf_is_refused_before_anything_runs(tiny, tmp_path):
    from dialsum_raw import sweep
    from dialsum_raw.errors import UserError
    with pytest.raises(UserError, match=r"point lr=inf,seed=1: --lr must be a finite number, got inf"):
        sweep.load(_sweep_file(tmp_path, tiny, tmp_path / "out", grid="lr = [inf, 1e-3]\nseed = [1]"))
    assert not (tmp_path / "out").exists()


def test_flags_that_crashed_later_are_refused_up_front(tiny):
    """--seed past int64 (ValueError deep in torch), --max-new-tokens 1000000 (an 8 TB bias), a residual
    init's rank above a target's min(in, out) (a size-mismatch RuntimeError): each one line, before any
    work."""
    from dialsum_raw import lora
    from dialsum_raw.config import Settings, validate
    from dialsum_raw.errors import UserError
    from dialsum_raw.generation import generate_ids
    from dialsum_raw.modeling import load_model, load_tokenizer
    with pytest.raises(UserError, match=r"^--seed must be in \[0, 2\*\*63\), got 99999999999999999999$"):
        validate(Settings(seed=99999999999999999999))
    model = load_model(tiny)
    with pytest.raises(
        UserError, match="^--max-new-tokens 1000000 is more than the 512 positions this model"
    ):
        generate_ids(model, load_tokenizer(tiny), ["#Person1#: Hi."], Settings(max_new_tokens=1000000))
    for init in ("pissa", "olora", "mica"):
        with pytest.raises(
            UserError,
            match=f"^--lora-init {init} cuts A and B from W: --lora-rank 65 is more than "
            r"min\(in, out\) = 64 of layer encoder.block.0.layer.0.SelfAttention.q",
        ):
            lora.inject(model, lora.LoRAConfig(("q", "v"), rank=65, init=init))
        assert not lora.lora_layers(model)  # refused before any layer was wrapped
    lora.inject(
        load_model(tiny), lora.LoRAConfig(("q", "v"), rank=64, init="pissa")
    )  # min(in, out) itself fits


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--epochs", "inf"], "--epochs must be a finite number, got inf"),
        (["--seed", "99999999999999999999"], "--seed must be in [0, 2**63)"),
    ],
)  # the rank and --max-new-tokens checks run on the model: test_flags_that_crashed_later_are_refused_up_front
def test_train_refuses_them_in_one_line(tiny, tmp_path, flags, message):
    _fails(
        [
            TRAIN,
            "--config",
            SMOKE,
            "--model",
            tiny,
            "--data",
            CORPUS,
            "--output-dir",
            str(tmp_path / "o"),
            *flags,
        ],
        message,
    )


# ---------------------------------------------------------------- the lock (item 7, item 11's rule)

def _no_flock(monkeypatch):
    """A filesystem without flock, as Lustre without -o flock answers: ENOSYS."""
    import errno
    import fcntl

    def flock(f, op):
        raise OSError(errno.ENOSYS, "Function not implemented")
    monkeypatch.setattr(fcntl, "flock", flock)


def _take(checkpoint, folder):
    with checkpoint.lock(folder):
        pass


def _dead_pid():
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_without_flock_an_exclusive_lock_file_holds_the_folder(tmp_path, monkeypatch):
    import os
    import socket

    from dialsum_raw import checkpoint
    from dialsum_raw.errors import UserError
    _no_flock(monkeypatch)
    out, excl = tmp_path / "run", tmp_path / "run" / ".lock.excl"
    with checkpoint.lock(str(out)):
        assert excl.read_text().startswith(f"pid {os.getpid()} on {socket.gethostname()} since ")
        with pytest.raises(
            UserError, match=rf"^{out} is in use by pid {os.getpid()} on .*delete that file if the "
        ):
            _take(checkpoint, str(out))
        assert excl.exists()  # the refused one left the holder's file alone
        checkpoint.prepare_output_dir(
            str(out), False, "settings.toml"
        )  # the lock files are not a run's content
    assert not excl.exists() and (out / ".lock").exists()
    # stale: left by a process of this host that is gone -> taken over; another host's -> refused
    excl.write_text(f"pid {_dead_pid()} on {socket.gethostname()} since then\n")
    with checkpoint.lock(str(out)):
        assert excl.read_text().startswith(f"pid {os.getpid()} ")
    excl.write_text("pid 1 on some-other-node since then\n")
    with pytest.raises(UserError, match="in use by pid 1 on some-other-node since then"):
        _take(checkpoint, str(out))


def test_a_lock_file_that_cannot_be_used_is_one_line(tmp_path, monkeypatch):
    import fcntl

    from dialsum_raw import checkpoint
    from dialsum_raw.errors import UserError
    (tmp_path / "dir" / ".lock").mkdir(parents=True)
    with pytest.raises(
        UserError, match=rf"^{tmp_path / 'dir' / '.lock'} is a folder, not a lock file: remove it$"
    ):
        _take(checkpoint, str(tmp_path / "dir"))
    # non-UTF-8 bytes in a lock another open file description holds
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / ".lock").write_bytes(b"pid 7 \xff\xfe on x")
    with open(tmp_path / "bin" / ".lock", "rb") as other:
        fcntl.flock(other, fcntl.LOCK_EX)
        with pytest.raises(UserError, match=r"is in use by pid 7 \ufffd\ufffd on x; wait for it"):
            _take(checkpoint, str(tmp_path / "bin"))
    # no permission (the suite may run as root, which ignores file modes: the refusal is simulated)
    real = checkpoint.os.open

    def refused(path, *a, **k):
        if str(path).endswith(".lock"):
            raise PermissionError(13, "Permission denied")
        return real(path, *a, **k)
    monkeypatch.setattr(checkpoint.os, "open", refused)
    with pytest.raises(UserError, match=r"^cannot write the lock file .*\.lock \(permission denied\)"):
        _take(checkpoint, str(tmp_path / "ro"))


@pytest.mark.parametrize("ending, kept", [(None, True), ("stopped", True), ("error", False)])
def test_a_fresh_runs_lock_file_stays_when_it_finishes_or_stops(tmp_path, ending, kept):
    """One rule: a run folder keeps its .lock whether the run finished or was stopped by a signal; only a
    block that ends in an error (a refused start) takes away the file it created."""
    from dialsum_raw import checkpoint
    from dialsum_raw.errors import Stopped, UserError
    try:
        with checkpoint.lock(str(tmp_path / "run")):
            if ending == "stopped":
                raise Stopped("stopped by signal 15", 143)
            if ending == "error":
                raise UserError("refused")
    except (Stopped, UserError):
        pass
    assert (tmp_path / "run" / ".lock").exists() == kept


# ---------------------------------------------------------------- messages that match what happened (item 10)

@pytest.mark.slow
def test_a_launcher_gone_during_validation_names_the_save_that_happened(tiny, tmp_path, monkeypatch):
    """torchrun killed while its workers validate: they finish the validation and save it (a consistent
    checkpoint), then stop at the next step. The message said 'without saving'; it must name last/'s step."""
    from test_training import _settings

    from dialsum_raw import checkpoint
    from dialsum_raw.errors import UserError
    monkeypatch.setenv("LOCAL_RANK", "0")  # as under torchrun: the worker watches its parent, the launcher
    validate = training.validate

    def launcher_dies(run, bar):
        validate(run, bar)
        run.launcher = -1  # no process has this pid: the parent has changed
    monkeypatch.setattr(training, "validate", launcher_dies)
    out = tmp_path / "run"
    with pytest.raises(UserError) as stopped:
        training.train(_settings(tiny, out, max_steps=6, eval_every=2))
    assert (
        checkpoint.load_state(str(out / "last"))["step"] == 2 and checkpoint.best_step(str(out / "best")) == 2
    )
    assert str(stopped.value) == (
        f"the launcher of this run (torchrun, pid -1) is gone: stopped at step 2 before "
        f"taking the next; the last good checkpoint is {out / 'last'}, step 2: continue "
        f"with python train.py --resume {out}"
    )


@pytest.mark.parametrize("world, local, command", [
    (1, 1, "python train.py --resume OUT"),
    (2, 2, "torchrun --standalone --nproc_per_node 2 train.py --resume OUT"),
    (16, 8, "torchrun --nnodes 2 ... --nproc_per_node 8 train.py --resume OUT"),
])
def test_a_stopped_run_under_torchrun_is_continued_with_torchrun(monkeypatch, world, local, command):
    """SIGTERM under torchrun --fsdp printed `python train.py --resume`, which that run refuses (the process
    count differs): the message names the launcher and the counts the run needs."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))
    run = types.SimpleNamespace(world=world, out="OUT")
    assert training.resume_command(run) == command


def test_one_setting_spelled_twice_is_refused(tmp_path, tiny):
    """lora-rank and lora_rank in one config file (or one sweep table) are one setting: the last silently
    won."""
    from dialsum_raw import sweep
    from dialsum_raw.config import read_config
    from dialsum_raw.errors import UserError
    config = tmp_path / "c.toml"
    config.write_text("lora-rank = 8\nlr = 1e-3\nlora_rank = 0\n")
    with pytest.raises(
        UserError, match=f"^{config}: 'lora-rank' and 'lora_rank' are the same setting; keep one$"
    ):
        read_config(str(config))
    with pytest.raises(UserError, match="'max_steps' and 'max-steps' are the same setting"):
        sweep.load(_sweep_file(tmp_path, tiny, tmp_path / "out", extra="max-steps = 3\n"))


# ---------------------------------------------------------------- a stalled rank (item 12)

def test_rank_0_names_the_rank_it_waits_for():
    """Three ranks. Rank 2 stalls in step 6's forward pass while ranks 0 and 1 wait in its gradient sync:
    nothing is said before the interval, then one line per interval names rank 2 (not rank 1) and where it
    is. Later rank 2 is paused inside the validation's loss sum, where rank 0 waits too: its pulse stops."""
    import torch.distributed as dist

    from dialsum_raw.heartbeat import Heartbeat
    store, said = dist.HashStore(), []
    ranks = [Heartbeat(store, r, 3, said.append, every=300) for r in range(3)]
    alive = {1, 2}

    def tick(t):
        """The pulse threads' tick at time t: the live ranks pulse, rank 0 checks."""
        for r in alive:
            ranks[r].pulse()
        return ranks[0].check(t)

    assert tick(0) is None  # before the loop's first beat (loading a model, the data): nothing
    for r in range(3):
        ranks[r].beat(6, "batch")
        ranks[r].beat(6, "forward")  # rank 2 stalls here
    ranks[1].beat(6, "gradients")
    ranks[0].beat(6, "gradients")
    t0 = ranks[0].since
    assert tick(t0 + 299) is None and said == []
    assert tick(t0 + 300) == (
        "waiting for rank 2 for 5 min: it last reported forward of step 6, rank 0 is at gradients of step 6"
    )
    assert tick(t0 + 400) is None  # once per interval
    assert tick(t0 + 600).startswith("waiting for rank 2 for 10 min") and len(said) == 2
    ranks[2].beat(6, "gradients")  # it caught up: rank 0's collective goes on, and it moves
    for r in (1, 2, 0):
        ranks[r].beat(6, "validation")
        ranks[r].beat(6, "validation sum")  # all three in the collective; rank 2 then paused there
    t1 = ranks[0].since
    tick(t1 + 60)
    alive.discard(2)
    assert tick(t1 + 300) is None  # silent for 240 s: less than the interval
    assert tick(t1 + 600) == (
        "waiting for rank 2 for 10 min: it has given no sign of life for 540 s (paused, or its "
        "host is down), rank 0 is at validation sum of step 6"
    )
    assert all("rank 1" not in line for line in said)
    alive.add(2)
    for r in (1, 2, 0):
        ranks[r].beat(7, "batch")  # every rank at its place and alive: rank 0 busy on its own says nothing
    assert tick(ranks[0].since + 300) is None and tick(ranks[0].since + 900) is None


@pytest.mark.slow
def test_an_elastic_restart_resumes_from_last_and_never_starts_over(tiny, tmp_path, monkeypatch, capsys):
    """torchrun --max-restarts N reruns the same command (here with --overwrite) after a worker dies. The
    restart (TORCHELASTIC_RESTART_COUNT > 0) resumes from last/ and finishes: no step twice, none lost; with
    no checkpoint yet it is refused in one line, never started over."""
    from test_training import _settings

    from dialsum_raw import checkpoint
    from dialsum_raw.errors import UserError
    out, step = tmp_path / "run", training.train_step

    def dies_at_step_3(run, *args):
        if run.progress.step == 3:
            raise RuntimeError("a worker died")
        return step(run, *args)
    monkeypatch.setattr(training, "train_step", dies_at_step_3)
    with pytest.raises(RuntimeError):
        training.train(_settings(tiny, out, max_steps=6, save_every=2, overwrite=True))
    monkeypatch.setattr(training, "train_step", step)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    training.train(_settings(tiny, out, max_steps=6, save_every=2, overwrite=True))
    assert f"torchrun restart 1: resuming {out} from its last checkpoint" in capsys.readouterr().out
    assert [m["step"] for m in metric_lines(out) if "val_loss" not in m] == [1, 2, 3, 4, 5, 6]
    assert checkpoint.load_state(str(out / "last"))["step"] == 6 and (out / "summary.json").is_file()
    with pytest.raises(
        UserError,
        match=f"^torchrun restarted this run \\(restart 1\\), but {tmp_path / 'new'} holds "
        "no checkpoint yet to resume from",
    ):
        training.train(_settings(tiny, tmp_path / "new", max_steps=6))


@pytest.mark.slow
def test_a_stalled_rank_is_named_and_an_elastic_restart_resumes_from_last(tiny, tmp_path):
    """torchrun --max-restarts 1, two workers. Rank 1 is paused (SIGSTOP) once last/ exists: rank 0 names it
    within the (test-short) heartbeat interval. Rank 1 is then killed: torchrun restarts both workers with the
    same command, and the restart resumes from last/ (never starts over) and finishes the run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from test_training import _children

    from dialsum_raw import checkpoint
    out, log = tmp_path / "run", tmp_path / "torchrun.log"
    cmd = train_cmd(
        tiny,
        out,
        "--max-steps",
        "8",
        "--save-every",
        "2",
        "--eval-every",
        "8",
        "--lora-rank",
        "4",
        "--batch-size",
        "4",
        "--overwrite",
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIALSUM_HEARTBEAT_S": "1"}
    with open(log, "w") as sink:
        launcher = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                "2",
                "--max-restarts",
                "1",
                *cmd[1:],
            ],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.time() + 180
        while (
            checkpoint.find(str(out / "last")) is None and time.time() < deadline and launcher.poll() is None
        ):
            time.sleep(0.02)
        workers = sorted(_children(launcher.pid))
        assert len(workers) == 2, log.read_text()[-3000:]
        rank1 = next(pid for pid in workers if b"LOCAL_RANK=1\0" in Path(f"/proc/{pid}/environ").read_bytes())
        os.kill(rank1, signal.SIGSTOP)
        deadline = time.time() + 60
        while "waiting for rank 1 for " not in log.read_text() and time.time() < deadline:
            time.sleep(0.1)
        os.kill(rank1, signal.SIGKILL)
        assert launcher.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    text = log.read_text()
    assert re.search(r"waiting for rank 1 for \d+ s: it (last reported|has given no sign of life)", text)
    assert "torchrun restart 1: resuming" in text and "resumed from" in text
    assert [m["step"] for m in metric_lines(out) if "val_loss" not in m] == list(
        range(1, 9)
    )  # no step twice, none lost
    assert checkpoint.load_state(str(out / "last"))["step"] == 8 and (out / "summary.json").is_file()

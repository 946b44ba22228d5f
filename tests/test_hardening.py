"""Issue 29: silent wrong results, unresumable runs and tracebacks an adversarial review found, each held
here by a test that failed before its fix."""

import json
import shutil
import types

import pytest
from conftest import CORPUS
from test_failures import EVAL, SMOKE, TRAIN, _fails
from test_sweep import _sweep_file

from dialsum_raw import training


def test_resume_trims_a_log_with_blank_and_damaged_lines(tmp_path):
    """A blank line (a hand edit, a copy) and a line a crash cut short: the resume's trim drops them with a
    note naming the line, and keeps every good line up to the checkpoint's step."""
    lines = [{"step": 2, "loss": 1.0}, {"step": 4, "loss": 0.5}, {"step": 6, "loss": 0.25}]
    log = tmp_path / "metrics.jsonl"
    log.write_text(json.dumps(lines[0]) + "\n\n" + json.dumps(lines[1]) + "\n" + json.dumps(lines[2]) + '\n{"st')
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


@pytest.mark.parametrize("cfg, edit, message", [
    ({"alpha": 64.0}, {"alpha": None}, "adapter field 'alpha' is missing: format dialsum_raw-lora/2 holds every field"),
    ({"variant": "dora"}, {"variant": None}, "adapter field 'variant' is missing"),
    ({"init": "gaussian"}, {"init": None}, "adapter field 'init' is missing"),
    ({}, {"rank": 4.0}, "adapter rank must be an integer, got 4.0"),
    ({}, {"rslora": 1}, "adapter rslora must be true or false, got 1"),
    ({}, {"alpha": True}, "adapter alpha must be a number, got True"),
    ({}, {"scale": 2}, "adapter field 'scale' is not one of targets, rank"),
])
def test_an_adapter_json_missing_or_mistyping_a_field_is_the_adapters_fault(tiny, tmp_path, cfg, edit, message):
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
    assert (cfg.alpha, cfg.dropout, cfg.rslora, cfg.variant, cfg.init) == (16.0, 0.0, False, "lora", "kaiming")


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
    with pytest.raises(UserError, match=f"^{folder / f'dialogsum.{name}.jsonl'}: the '{split}' split holds no dialogue"):
        data.load_splits(str(folder), (split,))


@pytest.mark.slow
def test_evaluate_and_train_on_an_empty_split_exit_2_in_one_line(tiny, tmp_path):
    """evaluate.py --split validation on an empty file used to write ROUGE 0.00 and exit 0; train.py on blank
    lines ended in an IndexError inside the tokenizer."""
    folder = _data_with(tmp_path, dev="", train="\n\n")
    _fails([EVAL, "--base", tiny, "--data", str(folder), "--split", "validation", "--output-dir", str(tmp_path / "e")],
           f"{folder / 'dialogsum.dev.jsonl'}: the 'validation' split holds no dialogue")
    assert not (tmp_path / "e" / "report.md").exists()
    _fails([TRAIN, "--config", SMOKE, "--model", tiny, "--data", str(folder), "--output-dir", str(tmp_path / "t")],
           f"{folder / 'dialogsum.train.jsonl'}: the 'train' split holds no dialogue")


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
    init's rank above a target's min(in, out) (a size-mismatch RuntimeError): each one line, before any work."""
    from dialsum_raw import lora
    from dialsum_raw.config import Settings, validate
    from dialsum_raw.errors import UserError
    from dialsum_raw.generation import generate_ids
    from dialsum_raw.modeling import load_model, load_tokenizer
    with pytest.raises(UserError, match=r"^--seed must be in \[0, 2\*\*63\), got 99999999999999999999$"):
        validate(Settings(seed=99999999999999999999))
    model = load_model(tiny)
    with pytest.raises(UserError, match="^--max-new-tokens 1000000 is more than the 512 positions this model"):
        generate_ids(model, load_tokenizer(tiny), ["#Person1#: Hi."], Settings(max_new_tokens=1000000))
    for init in ("pissa", "olora", "mica"):
        with pytest.raises(UserError, match=f"^--lora-init {init} cuts A and B from W: --lora-rank 65 is more than "
                                            r"min\(in, out\) = 64 of layer encoder.block.0.layer.0.SelfAttention.q"):
            lora.inject(model, lora.LoRAConfig(("q", "v"), rank=65, init=init))
        assert not lora.lora_layers(model)  # refused before any layer was wrapped
    lora.inject(load_model(tiny), lora.LoRAConfig(("q", "v"), rank=64, init="pissa"))  # min(in, out) itself fits


@pytest.mark.slow
@pytest.mark.parametrize("flags, message", [
    (["--epochs", "inf"], "--epochs must be a finite number, got inf"),
    (["--seed", "99999999999999999999"], "--seed must be in [0, 2**63)"),
    (["--lora-rank", "65", "--lora-init", "pissa"], "--lora-init pissa cuts A and B from W: --lora-rank 65"),
    (["--eval-rouge", "2", "--max-new-tokens", "1000000"], "--max-new-tokens 1000000 is more than the 512"),
])
def test_train_refuses_them_in_one_line(tiny, tmp_path, flags, message):
    _fails([TRAIN, "--config", SMOKE, "--model", tiny, "--data", CORPUS, "--output-dir", str(tmp_path / "o"), *flags],
           message)


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
        with pytest.raises(UserError, match=rf"^{out} is in use by pid {os.getpid()} on .*delete that file if the "):
            _take(checkpoint, str(out))
        assert excl.exists()  # the refused one left the holder's file alone
        checkpoint.prepare_output_dir(str(out), False, "settings.toml")  # the lock files are not a run's content
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
    with pytest.raises(UserError, match=rf"^{tmp_path / 'dir' / '.lock'} is a folder, not a lock file: remove it$"):
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
    assert checkpoint.load_state(str(out / "last"))["step"] == 2 and checkpoint.best_step(str(out / "best")) == 2
    assert str(stopped.value) == (f"the launcher of this run (torchrun, pid -1) is gone: stopped at step 2, before "
                                  f"taking the next; the last good checkpoint is {out / 'last'}, step 2: continue "
                                  f"with python train.py --resume {out}")


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

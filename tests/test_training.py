import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import zygote

from conftest import (CORPUS, REPO, ckpt_weights, max_diff, metric_lines, ranks, ranks_killed, train_cmd,
                      train_losses, two_process_cmd)
from dialsum_raw import checkpoint, training
from dialsum_raw.config import SETTINGS_FILE, Settings, read_run_settings, validate
from dialsum_raw.errors import UserError


def test_lr_schedule_matches_hf():
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup
    p = [torch.nn.Parameter(torch.zeros(1))]
    for schedule, hf in (
        ("linear", get_linear_schedule_with_warmup),
        ("cosine", get_cosine_schedule_with_warmup),
    ):
        ref = hf(torch.optim.SGD(p, lr=1.0), 7, 50)
        for step in range(50):
            assert training.lr_factor(step, 50, 7, schedule) == pytest.approx(ref.get_last_lr()[0], abs=1e-12)
            ref.optimizer.step(); ref.step()


def test_no_weight_decay_on_norms_and_biases():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    s = Settings(weight_decay=0.01)
    groups = training.make_optimizer(model, s).param_groups
    assert [(g["weight_decay"], len(g["params"])) for g in groups] == [(0.01, 1), (0.0, 3)]


@pytest.mark.slow
@pytest.mark.parametrize("lora_flags", [
    ["--lora-rank", "4", "--lora-dropout", "0.1", "--lr", "1e-2"],
    ["--lora-rank", "4", "--lora-dropout", "0.1", "--lr", "1e-2", "--dora", "--lora-init", "pissa",
     "--lora-plus-ratio", "4", "--base-dtype", "nf4"],  # QLoRA: the residual is quantized again on resume
    ["--lora-rank", "0"]], ids=["lora", "qlora-dora-pissa-loraplus", "full"])
def test_resume_after_sigkill_matches_uninterrupted(tiny, tmp_path, lora_flags):
    """Dropout stays on, so equality also proves the RNG states were restored. The uninterrupted run goes
    side by side with the one that is killed (one core each)."""
    common = ["--max-steps", "12", "--eval-every", "3", "--log-every", "2", *lora_flags]
    straight = subprocess.Popen(train_cmd(tiny, tmp_path / "straight", *common), stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)

    killed = tmp_path / "killed"
    # the one SIGKILLed: for full fine-tuning a process started as the user starts it, else forked from the
    # zygote (tests/test_zygote.py: the same process, started sooner)
    with zygote.real_processes() if lora_flags == ["--lora-rank", "0"] else contextlib.nullcontext():
        proc = subprocess.Popen(
            train_cmd(tiny, killed, *common), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
    deadline = time.time() + 120
    while checkpoint.find(str(killed / "last")) is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = checkpoint.load_state(checkpoint.find(str(killed / "last")))["step"]
    assert 0 < step < 12, "the run must be killed mid-way"
    out = straight.communicate()[0]
    assert straight.returncode == 0
    assert "trainable model parameters:" in out and "percentage of trainable model parameters:" in out

    subprocess.run(
        [sys.executable, os.path.join(REPO, "train.py"), "--resume", str(killed)],
        check=True,
        capture_output=True,
    )
    a, b = ckpt_weights(tmp_path / "straight" / "last"), ckpt_weights(killed / "last")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert checkpoint.load_state(str(killed / "last"))["step"] == 12
    logged = [m for m in metric_lines(killed) if "val_loss" not in m]
    assert [m["step"] for m in logged] == list(
        range(2, 13, 2)
    )  # lines after the checkpoint dropped, none repeated
    straight = [m for m in metric_lines(tmp_path / "straight") if "val_loss" not in m]
    assert (
        max(abs(a["loss"] - b["loss"]) for a, b in zip(logged, straight)) <= 1e-6
    )  # windows span the restart
    assert [m["tokens"] for m in logged] == [m["tokens"] for m in straight]
    assert metric_lines(killed)[-1]["val_loss"] == pytest.approx(
        metric_lines(tmp_path / "straight")[-1]["val_loss"], abs=1e-6
    )


@pytest.mark.slow
def test_two_processes_equal_one(tiny, tmp_path):
    """2 gloo processes x batch 4 (DDP, the ranks started as torchrun starts them: conftest.ranks) take the
    same steps as 1 process x batch 8: the weights after 4 steps agree (a wrong gradient scale would show here
    even where AdamW and clipping hide it in the loss), and validation ROUGE generated in two shards equals
    one process's. The 2-process run also replaces an earlier run with --overwrite, which only rank 0 may
    check and delete."""
    common = ["--max-steps", "4", "--dropout", "0", "--lora-rank", "4", "--lora-dropout", "0", "--lr", "1e-2",
              "--eval-every", "4", "--grad-accum", "2", "--eval-rouge", "6",
              "--max-new-tokens", "12"]
    subprocess.run(
        train_cmd(tiny, tmp_path / "one", "--batch-size", "8", *common), check=True, capture_output=True
    )
    subprocess.run(train_cmd(tiny, tmp_path / "two", "--max-steps", "1", "--eval-every", "1"), check=True,
                   capture_output=True)
    ranks(train_cmd(tiny, tmp_path / "two", "--batch-size", "4", "--overwrite", *common))
    assert max_diff(ckpt_weights(tmp_path / "one" / "last"), ckpt_weights(tmp_path / "two" / "last")) <= 1e-5
    one, two = metric_lines(tmp_path / "one"), metric_lines(tmp_path / "two")
    assert [m["step"] for m in one] == [m["step"] for m in two] == [1, 2, 3, 4, 4]
    assert [m["tokens"] for m in one] == [m["tokens"] for m in two]
    assert {k: one[-1][k] for k in ("rouge1", "rouge2", "rougeL")} == {
        k: two[-1][k] for k in ("rouge1", "rouge2", "rougeL")
    }
    assert abs(one[-1]["val_loss"] - two[-1]["val_loss"]) <= 1e-5
    assert json.load(open(tmp_path / "two" / "summary.json"))["global_batch"] == 16


@pytest.mark.slow
def test_two_process_resume_after_sigkill_matches_uninterrupted(tiny, tmp_path, two_process):
    """Dropout on in both processes: each rank must get its own RNG state back, or the masks repeat. The
    uninterrupted run is the shared 2-process LoRA run (conftest.two_process_cmd)."""
    killed = tmp_path / "killed"
    state = ranks_killed(two_process_cmd(tiny, killed, "lora", "ddp"), killed)
    assert 0 < state["step"] < 8 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    ranks([sys.executable, os.path.join(REPO, "train.py"), "--resume", str(killed)])
    assert max_diff(ckpt_weights(two_process("lora", "ddp") / "last"), ckpt_weights(killed / "last")) <= 1e-6


def _settings(tiny, out, **over):
    s = Settings(
        **{
            **dict(
                model=tiny,
                data=CORPUS,
                output_dir=str(out),
                lora_rank=4,
                lora_dropout=0.0,
                dropout=0.0,
                lr=1e-2,
                batch_size=8,
                max_steps=3,
                subsample=40,
                max_source_len=128,
                max_target_len=32,
                eval_every=100,
                log_every=1,
                seed=0,
                precision="fp32",
            ),
            **over,
        }
    )
    validate(s)
    return s


@pytest.mark.slow
def test_grad_accumulation_equals_the_big_batch(tiny, tmp_path):
    """2 x batch 4 with accumulation and 1 x batch 8 see the same examples and must take the same steps."""
    training.train(_settings(tiny, tmp_path / "big"))
    training.train(_settings(tiny, tmp_path / "acc", batch_size=4, grad_accum=2))
    assert max_diff(ckpt_weights(tmp_path / "big" / "last"), ckpt_weights(tmp_path / "acc" / "last")) <= 1e-6


@pytest.mark.slow
def test_save_every_writes_last_between_validations(tiny, tmp_path, monkeypatch):
    saved = []
    real = checkpoint.save
    monkeypatch.setattr(
        checkpoint, "save", lambda path, *a, **k: (saved.append(a[-1]["step"]), real(path, *a, **k))
    )
    training.train(_settings(tiny, tmp_path / "every", max_steps=7, save_every=3))
    assert saved == [3, 6, 7]
    saved.clear()
    training.train(_settings(tiny, tmp_path / "never", max_steps=7))
    assert saved == [7]


@pytest.mark.slow
def test_best_is_weights_and_step_only_and_is_repaired_on_resume(tiny, tmp_path):
    """A crash after last/ is written and before best/ is copied leaves best/ stale; resume repairs it."""
    out = tmp_path / "run"
    subprocess.run(
        train_cmd(tiny, out, "--lora-rank", "4", "--lr", "1e-2", "--max-steps", "4", "--eval-every", "2"),
        check=True,
        capture_output=True,
    )
    state = checkpoint.load_state(str(out / "last"))
    best = json.loads((out / "best" / "best.json").read_text())
    assert best == {"step": state["best_step"], "metric": "val_loss", "value": state["best_value"]}
    assert state["best_step"] == 4, "the tiny model's validation loss falls over 4 steps at this lr"
    assert sorted(os.listdir(out / "best")) == ["adapter.json", "adapter.safetensors", "best.json"]
    (out / "best" / "best.json").write_text(json.dumps({"step": 2, "metric": "val_loss", "value": 9.0}))
    (out / "best" / "adapter.safetensors").write_bytes(b"stale")
    res = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--resume", str(out)], check=True,
                         capture_output=True, text=True)
    assert "repaired to step 4" in res.stdout
    assert json.loads((out / "best" / "best.json").read_text())["step"] == 4
    assert max_diff(ckpt_weights(out / "best"), ckpt_weights(out / "last")) == 0


@pytest.mark.slow
def test_resume_refuses_flags_that_change_the_run(tiny, tmp_path):
    from dialsum_raw.config import read_config
    out = tmp_path / "run"
    subprocess.run(
        train_cmd(tiny, out, "--max-steps", "4", "--eval-every", "2", "--save-every", "2"),
        check=True,
        capture_output=True,
    )
    resume = [sys.executable, os.path.join(REPO, "train.py"), "--resume", str(out)]
    res = subprocess.run(
        [
            *resume,
            "--batch-size",
            "4",
            "--seed",
            "7",
            "--max-source-len",
            "256",
            "--log-every",
            "3",
            "--save-every",
            "5",
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2
    last = res.stderr.strip().splitlines()[-1]
    assert "batch_size 8 -> 4" in last and "seed 42 -> 7" in last and "max_source_len 128 -> 256" in last
    assert "log_every" not in last and "save_every" not in last  # harmless changes pass
    res = subprocess.run(
        [*resume, "--output-dir", str(tmp_path / "elsewhere")], capture_output=True, text=True
    )
    assert res.returncode == 2 and "continues that run in its own folder" in res.stderr
    s = Settings(**read_config(str(out / "settings.toml")), resume=str(out))
    with pytest.raises(UserError, match="processes 2 -> 1"):
        training.check_resume_settings(s, {"world": 2}, 1)

    # lines logged after the checkpoint, and one a crash cut short, are dropped on resume
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 99, "loss": 1.0}) + "\n" + '{"step": 10')
    res = subprocess.run([*resume, "--log-every", "3", "--max-steps", "4"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-1500:]
    assert max(m["step"] for m in metric_lines(out)) == 4


@pytest.mark.slow
def test_early_stop_after_k_validations_without_improvement(tiny, tmp_path, monkeypatch):
    losses = iter([3.0, 2.0, 2.5, 2.1, 1.0, 0.5])  # best at the 2nd validation, then two without improvement
    monkeypatch.setattr(training, "validation_loss", lambda *a: next(losses))
    summary = training.train(_settings(tiny, tmp_path / "run", max_steps=12, eval_every=2, early_stop=2))
    assert summary["steps"] == 8 and summary["best_step"] == 4 and summary["best_value"] == 2.0
    assert json.loads((tmp_path / "run" / "best" / "best.json").read_text())["step"] == 4


@pytest.mark.slow
def test_rouge_during_training_picks_best(tiny, tmp_path):
    """The logged ROUGE is the evaluator's on the same model; --best-metric rouge1 keeps the highest."""
    from dialsum_raw import metrics
    from dialsum_raw.data import load_splits
    from dialsum_raw.generation import summarize
    from dialsum_raw.modeling import load_model, load_tokenizer
    s = _settings(tiny, tmp_path / "run", max_steps=6, eval_every=2, eval_rouge=5, best_metric="rouge1",
                  max_new_tokens=16, lr=3e-2, lora_rank=0)
    training.train(s)
    val = [m for m in metric_lines(s.output_dir) if "val_loss" in m]
    assert [m["step"] for m in val] == [2, 4, 6] and all("loss" not in m for m in val)
    dialogues = load_splits(CORPUS, ("validation",))["validation"][::s.subsample][:5]
    preds = summarize(load_model(os.path.join(s.output_dir, "last")), load_tokenizer(tiny),
                      [d.dialogue for d in dialogues], s)
    expect = metrics.rouge(preds, [d.refs for d in dialogues])["per_row"]
    assert val[-1]["rouge1"] == pytest.approx(expect["rouge1"], abs=1e-6)
    assert val[-1]["rougeL"] == pytest.approx(expect["rougeL"], abs=1e-6)
    best = json.loads((tmp_path / "run" / "best" / "best.json").read_text())
    top = max(val, key=lambda m: m["rouge1"])  # the first of equal values wins
    assert best["metric"] == "rouge1" and best["step"] == top["step"] and best["value"] == top["rouge1"]


@pytest.mark.slow
def test_tensorboard_gets_the_metrics_lines(tiny, tmp_path, monkeypatch):
    import types
    written = []

    class Writer:
        def __init__(self, logdir, purge_step=None):
            written.append(("open", purge_step))

        def add_scalar(self, tag, value, step):
            written.append((tag, value, step))

        flush = close = lambda self: None

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    s = _settings(tiny, tmp_path / "run", max_steps=4, eval_every=2, tensorboard=True)
    training.train(s)
    expect = [("open", 1)] + [
        (k, v, m["step"]) for m in metric_lines(s.output_dir) for k, v in m.items() if k != "step"
    ]
    assert written == expect
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(UserError, match=r'pip install -e "\.\[tensorboard\]"'):
        training.train(_settings(tiny, tmp_path / "missing", tensorboard=True))


@pytest.mark.slow
def test_gradient_checkpointing_takes_the_same_steps(tiny, tmp_path, monkeypatch):
    """Dropout on: recomputation must replay the same masks, so the weights agree; and the blocks really
    are recomputed (each block's feed-forward runs twice per training micro-batch)."""
    from transformers.models.t5.modeling_t5 import T5LayerFF
    calls, real = [], T5LayerFF.forward
    monkeypatch.setattr(
        T5LayerFF, "forward", lambda self, *a, **k: (calls.append(self.training), real(self, *a, **k))[1]
    )
    counts = {}
    for name, flag in (("plain", False), ("ckpt", True)):
        calls.clear()
        training.train(
            _settings(tiny, tmp_path / name, dropout=0.1, lora_dropout=0.1, gradient_checkpointing=flag)
        )
        counts[name] = sum(calls)  # training-mode calls only (validation runs in eval mode)
    assert counts["ckpt"] == 2 * counts["plain"] > 0
    assert (
        max_diff(ckpt_weights(tmp_path / "plain" / "last"), ckpt_weights(tmp_path / "ckpt" / "last")) <= 1e-6
    )


def test_progress_is_saved_as_the_keys_runs_saved_before_it_was_a_dataclass():
    """trainer_state.pt keeps one key per counter, as runs saved them when progress was a dict (the state
    below), so those runs resume; a counter a state lacks keeps its start."""
    old = {
        "optimizer": {},
        "scheduler": {},
        "rng": [],
        "world": 1,
        "step": 7,
        "tokens": 900,
        "padded_tokens": 1000,
        "seconds": 3.5,
        "best_val_loss": 2.0,
        "best_step": 6,
        "best_value": 2.0,
        "stale": 1,
        "window_loss": 0.5,
        "window_tokens": 40,
    }
    progress = training.Progress.restore(old)
    assert progress.state() == {
        k: v for k, v in old.items() if k not in ("optimizer", "scheduler", "rng", "world")
    }
    assert training.Progress.restore({"step": 3}) == training.Progress(step=3)


def test_atomic_dir_flushes_everything_before_publishing(tmp_path, monkeypatch):
    events = []
    real_fsync, real_rename = os.fsync, os.rename
    monkeypatch.setattr(
        checkpoint.os,
        "fsync",
        lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd)),
    )
    monkeypatch.setattr(
        checkpoint.os, "rename", lambda a, b: (events.append(("rename", str(a), str(b))), real_rename(a, b))
    )
    target = tmp_path / "ckpt"
    with checkpoint.atomic_dir(str(target)) as tmp:
        for name in ("a.bin", "b.json"):
            with open(os.path.join(tmp, name), "w") as f:
                f.write(name)
    publish = events.index(("rename", f"{target}.tmp", str(target)))
    flushed = {e[1] for e in events[:publish] if e[0] == "fsync"}
    assert {f"{target}.tmp/a.bin", f"{target}.tmp/b.json", f"{target}.tmp"} <= flushed
    assert ("fsync", str(tmp_path)) in events[publish:]  # the rename itself made durable


@pytest.mark.slow
def test_tiny_model_learns_dialogsum(trained, tmp_path, monkeypatch):
    """From-scratch tiny T5, 50 steps at lr 3e-3 (the `trained` fixture's full run): losses fall from ~10.4
    (uniform over 32k) to below 5.1 on the validation rows (every 50th dialogue; the run reaches 4.98-4.99).

    The best unigram model of the summaries scores 5.85 nats on those rows when fit on the run's train rows
    and 5.45 when fit on all 12,460 (additive smoothing at its best value for them, targets cut at 64
    tokens), so passing needs more than the summaries' word frequencies (not the dialogue: with every source
    replaced by the first one it passes too, on the decoder's own context). The negative control trains the
    same settings in process with the gradients zeroed, and must fail the same threshold."""
    run = trained["full_run"]
    lines = metric_lines(run)
    assert lines[0]["loss"] > 9.0
    assert lines[-1]["step"] == 50 and lines[-1]["val_loss"] < 5.1
    assert json.loads((run / "summary.json").read_text())["best_val_loss"] < 5.1
    assert min(train_losses(run)) < 5.1

    real_backward = torch.Tensor.backward
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **k: real_backward(self * 0, *a, **k))
    s = Settings(**{**read_run_settings(run / SETTINGS_FILE), "output_dir": str(tmp_path / "broken"),
                    "max_steps": 10, "eval_every": 10})
    validate(s)
    training.train(s)
    assert metric_lines(tmp_path / "broken")[-1]["val_loss"] > 9.0


@pytest.mark.slow
@pytest.mark.parametrize(
    "rank,expect",
    [
        (
            "8",
            {
                "lora_rank": 8,
                "lora_alpha": 16.0,
                "lora_dropout": 0.05,
                "lora_targets": ["q", "v"],
                "lr": 0.001,
                "batch_size": 16,
                "grad_accum": 2,
                "epochs": 10.0,
                "warmup_ratio": 0.1,
                "weight_decay": 0.01,
                "lora_plus_ratio": 1.0,
            },
        ),
        (
            "0",
            {
                "lora_rank": 0,
                "lr": 0.0001,
                "batch_size": 8,
                "grad_accum": 2,
                "epochs": 10.0,
                "warmup_ratio": 0.1,
                "weight_decay": 0.01,
            },
        ),
    ],
)
def test_rank_picks_the_notebook_preset(tiny, tmp_path, rank, expect):
    """No --config: --lora-rank 8 runs the notebook's LoRA recipe, 0 its full one; flags still override."""
    try:
        import tomllib
    except ModuleNotFoundError:
        import tomli as tomllib
    out = tmp_path / "run"
    subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "train.py"),
            "--lora-rank",
            rank,
            "--model",
            tiny,
            "--data",
            CORPUS,
            "--output-dir",
            str(out),
            "--max-steps",
            "1",
            "--subsample",
            "200",
            "--max-source-len",
            "64",
        ],
        check=True,
        capture_output=True,
    )
    saved = tomllib.loads((out / "settings.toml").read_text())
    assert {k: saved[k] for k in expect} == expect
    assert saved["model"] == tiny and saved["max_source_len"] == 64 and saved["max_steps"] == 1


# ---------------------------------------------------------------- one writer per folder, GPUs, host waits

def _train_main(argv):
    """train.py's main in this process: refusals come back as UserError, without a subprocess's start-up."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_cli", os.path.join(REPO, "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(argv)


@pytest.mark.slow
@pytest.mark.real_processes  # the lock held by another process, as started by the user
def test_a_second_run_on_a_busy_folder_is_refused_and_the_first_finishes(tiny, tmp_path):
    """The first run is paused (SIGSTOP) while holding its folder, so the attempts meet it for sure: a plain
    start, --overwrite and --resume are all refused naming it, and it then finishes as if alone."""
    out = tmp_path / "run"
    first = subprocess.Popen(
        train_cmd(tiny, out, "--max-steps", "6", "--eval-every", "6", "--save-every", "2"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 180
    while checkpoint.find(str(out / "last")) is None and time.time() < deadline and first.poll() is None:
        time.sleep(0.02)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        holder = (out / ".lock").read_text().strip()
        assert holder.startswith(f"pid {first.pid} on {os.uname().nodename} since ")
        start = train_cmd(tiny, out)[2:]
        for argv in (start, [*start, "--overwrite"], ["--resume", str(out)]):
            with pytest.raises(UserError) as refused:
                _train_main(argv)
            assert str(refused.value) == f"{out} is in use by {holder}; wait for it or stop it"
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert [m["step"] for m in metric_lines(out) if "val_loss" not in m] == list(range(1, 7))
    assert checkpoint.load_state(str(out / "last"))["step"] == 6 and (out / "summary.json").is_file()


@pytest.mark.slow
def test_a_lock_left_by_a_dead_process_does_not_block(tiny, tmp_path):
    """A run killed while holding its lock leaves the file, naming a process that is gone; the kernel has
    released the flock, so a new run and --overwrite go ahead, and the file then names the new holder."""
    out = tmp_path / "run"
    training.train(_settings(tiny, out, max_steps=1))
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import fcntl, os, signal, sys; f = open(sys.argv[1], 'w'); "
            "fcntl.flock(f, fcntl.LOCK_EX); f.write(f'pid {os.getpid()} on here since then'); f.flush(); "
            "os.kill(os.getpid(), signal.SIGKILL)",
            str(out / ".lock"),
        ]
    )
    assert (out / ".lock").read_text().startswith("pid ")
    training.train(_settings(tiny, out, max_steps=1, overwrite=True))
    assert (out / ".lock").read_text().startswith(f"pid {os.getpid()} on ")


def test_overwrite_empties_the_folder_but_keeps_the_held_lock(tmp_path):
    """--overwrite deletes a run's files while holding its lock: the lock file stays, the same file, so a
    newcomer meets the lock rather than a fresh file of its own."""
    out = tmp_path / "run"
    with checkpoint.lock(str(out)):
        (out / "settings.toml").write_text("")
        (out / "last").mkdir()
        (out / "last" / "weights").write_text("old")
        inode = os.stat(out / ".lock").st_ino
        checkpoint.prepare_output_dir(str(out), True, "settings.toml")
        assert os.listdir(out) == [".lock"] and os.stat(out / ".lock").st_ino == inode
        with pytest.raises(UserError, match=f"^{out} is in use by pid {os.getpid()} on "):
            with checkpoint.lock(str(out)):
                pass


def _children(pid):
    """The pids whose parent is `pid` (from /proc)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def _running(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _files(folder):
    """Every file under `folder` with its bytes."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), folder)] = f.read()
    return out


@pytest.mark.slow
def test_workers_stop_without_writing_when_their_launcher_is_killed(tiny, tmp_path):
    """torchrun runs each worker in a session of its own: SIGKILL to the launcher alone leaves them running.
    They must notice within a step or two and stop, leaving last/ and metrics.jsonl as they were at the kill
    (without the check they train on to step 200, saving every 4 steps and logging every step)."""
    out, log = tmp_path / "run", tmp_path / "workers.log"
    cmd = train_cmd(
        tiny,
        out,
        "--max-steps",
        "200",
        "--save-every",
        "4",
        "--eval-every",
        "1000",
        "--lora-rank",
        "4",
        "--lr",
        "1e-2",
        "--batch-size",
        "4",
    )
    with open(log, "w") as stderr:
        launcher = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                "2",
                *cmd[1:],
            ],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    deadline = time.time() + 180
    while checkpoint.find(str(out / "last")) is None and time.time() < deadline and launcher.poll() is None:
        time.sleep(0.02)
    workers = _children(launcher.pid)
    launcher.kill()
    launcher.wait()
    time.sleep(0.5)  # a step that passed its check just before the kill may still log its line
    at_kill = _files(out / "last"), (out / "metrics.jsonl").read_bytes()
    try:
        assert len(workers) == 2
        deadline = time.time() + 60
        while any(map(_running, workers)) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(map(_running, workers)), "the workers outlived their launcher"
    finally:
        for pid in filter(_running, workers):
            os.kill(pid, signal.SIGKILL)
    assert (_files(out / "last"), (out / "metrics.jsonl").read_bytes()) == at_kill
    saved = checkpoint.load_state(str(out / "last"))["step"]
    stopped = [line for line in log.read_text().splitlines() if "is gone: stopped at step" in line]
    assert len(stopped) == 2 and all(saved <= int(line.split(" at step ")[1].split()[0]) <= saved + 3
                                     for line in stopped), stopped


@pytest.mark.slow
def test_validation_rouge_with_a_rank_that_gets_no_dialogue(tiny, two_process):
    """--eval-rouge 1 over 2 processes (the shared full fine-tuning DDP run): rank 1 has nothing to generate,
    joins the gather all the same, and the score is one process's on the same weights."""
    from dialsum_raw import metrics
    from dialsum_raw.config import read_config
    from dialsum_raw.data import load_splits
    from dialsum_raw.generation import summarize
    from dialsum_raw.modeling import load_model, load_tokenizer
    out = two_process("full", "ddp")
    s = Settings(**read_config(str(out / "settings.toml")))
    assert (s.eval_rouge, s.max_steps, s.eval_every) == (1, 8, 4)
    (dialogue,) = load_splits(CORPUS, ("validation",))["validation"][::s.subsample][:1]
    (summary,) = summarize(load_model(str(out / "last")), load_tokenizer(tiny), [dialogue.dialogue], s)
    expect = metrics.rouge([summary], [dialogue.refs])["per_row"]
    last = metric_lines(out)[-1]
    assert last["step"] == 8 and {k: last[k] for k in ("rouge1", "rouge2", "rougeL")} == {
        k: round(expect[k], 6) for k in ("rouge1", "rouge2", "rougeL")}


@pytest.mark.slow
def test_resume_keeps_no_cpu_copy_of_the_optimizer_state(tiny, tmp_path, monkeypatch):
    """Once loaded into the optimizer (a GPU copy on CUDA), the checkpoint's optimizer state is dropped."""
    out = tmp_path / "run"
    training.train(_settings(tiny, out, max_steps=2))
    saved = checkpoint.load_state(str(out / "last"))["optimizer"]["state"]
    seen, real = {}, training.restore
    monkeypatch.setattr(training, "restore", lambda run: (real(run), seen.update(
        state=run.resume_state, loaded=run.optimizer.state_dict()["state"])))
    training.train(_settings(tiny, out, max_steps=2, resume=str(out)))
    assert seen["state"]["step"] == 2 and "optimizer" not in seen["state"]
    assert saved.keys() == seen["loaded"].keys()
    assert all(torch.equal(saved[i]["exp_avg_sq"], seen["loaded"][i]["exp_avg_sq"]) for i in saved)


def test_more_processes_than_gpus_is_refused_and_every_gpu_is_set(monkeypatch):
    """CUDA's rules, with the CUDA calls stubbed: a rank without a GPU of its own is refused before any
    rank waits for the others; one process still makes its GPU current; the group gets each rank's
    device and a timeout long enough for rank 0's saves."""
    import datetime
    chosen, groups = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(training.dist, "init_process_group", lambda *a, **k: groups.append((a, k)))
    monkeypatch.setattr(training.dist, "get_rank", lambda: 1)
    store = torch.distributed.HashStore()
    monkeypatch.setattr(training.dist, "rendezvous", lambda url, timeout: iter([(store, 1, 2)]))
    for name, value in (("WORLD_SIZE", "2"), ("LOCAL_WORLD_SIZE", "2"), ("LOCAL_RANK", "1"),
                        ("TORCHELASTIC_RESTART_COUNT", "3")):
        monkeypatch.setenv(name, value)
    with pytest.raises(
        UserError,
        match=r"^2 processes on this machine but it has 1 GPU: run one process per GPU "
        r"\(torchrun --nproc_per_node 1\)$",
    ):
        training.setup_distributed()
    assert chosen == groups == []

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert training.setup_distributed() == (1, 2, torch.device("cuda:1"))
    assert chosen == [torch.device("cuda:1")]
    (args, kwargs), = groups
    group_store = kwargs.pop("store")
    assert args == ("nccl",) and kwargs == {"rank": 1, "world_size": 2, "device_id": torch.device("cuda:1"),
                                            "timeout": training.COLLECTIVE_TIMEOUT}
    group_store.set("key", "x")  # the group's keys live under this restart's prefix (PrefixStore adds a "/")
    assert store.check(["dialsum/restart3//key"]) and not store.check(["key"])
    assert training.COLLECTIVE_TIMEOUT >= datetime.timedelta(minutes=30)

    chosen.clear()
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(name)
    assert training.setup_distributed() == (0, 1, torch.device("cuda:0")) and chosen == [
        torch.device("cuda:0")
    ]


class _DeviceWaits(torch.overrides.TorchFunctionMode):
    """Counts, on a CPU run, the places in training.py where a CUDA run's host would wait for the GPU: a read
    into Python (item, tolist, int, float, bool) of a tensor computed on the device, and a blocking copy of
    host numbers to the device (torch.tensor(..., device=...), .to(device) without non_blocking). What the
    data loader made, and what is computed from that alone, is on the host and free to read."""
    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__int__, torch.Tensor.__float__,
             torch.Tensor.__bool__, torch.Tensor.__index__}
    PLUMBING = {
        torch._tensor.__file__,
        torch.overrides.__file__,
        __file__,
    }  # frames between the caller and the op

    def __init__(self):
        super().__init__()
        self.host, self.waits = {}, []  # id -> tensor made on the host; what waited

    def _is_host(self, t):
        return self.host.get(id(t)) is t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        frame = sys._getframe(1)
        while frame.f_code.co_filename in self.PLUMBING:
            frame = frame.f_back
        ours = frame.f_code.co_filename == training.__file__
        tensors = [t for a in (*args, *kwargs.values()) for t in (a if isinstance(a, (list, tuple)) else [a])
                   if isinstance(t, torch.Tensor)]
        moves = func is torch.Tensor.to and (
            any(isinstance(a, (torch.device, str)) for a in args[1:]) or "device" in kwargs
        )
        if ours and func in self.READS and not self._is_host(args[0]):
            self.waits.append(func.__name__)
        if ours and func is torch.tensor and kwargs.get("device") is not None:
            self.waits.append("tensor(device=)")
        if ours and moves and self._is_host(args[0]) and not kwargs.get("non_blocking"):
            self.waits.append("to(device)")
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            if moves:
                self.host.pop(id(out), None)
            elif all(map(self._is_host, tensors)) and (tensors or kwargs.get("device") is None):
                self.host[id(out)] = out
        return out


def test_a_training_step_waits_on_the_device_once(tiny, tmp_path, monkeypatch):
    """One process: no collective, and the loss is read once per step (the stop flags and token counts are
    host values). Counted with _DeviceWaits around each step."""
    waits, real = [], training.train_step

    def counted(*args):
        with _DeviceWaits() as mode:
            stop = real(*args)
        waits.append(mode.waits)
        return stop

    monkeypatch.setattr(training, "train_step", counted)
    training.train(_settings(tiny, tmp_path / "run", max_steps=3))
    assert waits == [["item"]] * 3


def test_summarize_moves_its_model_to_the_gpu_as_the_evaluator_does(tiny, tmp_path, monkeypatch):
    """With a GPU (stubbed: CUDA says it is there, Module.to records the move and stays on the CPU),
    summarize moves the model to modeling.compute_device(), the evaluator's device, before generating."""
    from dialsum_raw import summarize
    moved = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        torch.nn.Module, "to", lambda self, *a, **k: (moved.append((type(self).__name__, *a)), self)[1]
    )
    chat = tmp_path / "chat.txt"
    chat.write_text("Ann: Lunch at noon?\nBob: Sure.\n")
    summarize.main(["--model", tiny, "--precision", "fp32", "--max-new-tokens", "4", str(chat)])
    assert moved == [("T5ForConditionalGeneration", torch.device("cuda"))]

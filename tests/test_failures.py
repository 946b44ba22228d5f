"""Every failure a user can cause ends in one 'error: ...' line, exit 2, no traceback, nothing lost."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import zygote

from conftest import CORPUS, REPO
from dialsum_raw import checkpoint, lora
from dialsum_raw.modeling import load_model

TRAIN = os.path.join(REPO, "train.py")
EVAL = os.path.join(REPO, "evaluate.py")
SMOKE = os.path.join(REPO, "configs", "tiny-smoke.toml")


def _fails(cmd, message, cwd=REPO):
    res = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=cwd)
    assert res.returncode == 2, res.stderr[-1500:]
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, last
    return last


@pytest.mark.slow
@pytest.mark.parametrize("flags,message", [
    (["--lora-rank", "-1"], "--lora-rank must be >= 1 for LoRA (or 0 for full fine-tuning), got -1"),
    (["--lora-rank", "4", "--lora-alpha", "0"], "--lora-alpha must be > 0"),
    (["--lr", "-0.1"], "--lr must be > 0, got -0.1"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--lora-rank", "8", "--lora-targets", "q,qq"], "unknown LoRA target 'qq'; choose from q, k, v, o"),
    (["--precision", "fp16"], "precision fp16 is refused: T5 overflows in fp16"),
    (["--lora-rank", "0", "--dora"], "--dora is a LoRA setting, but --lora-rank 0 is full fine-tuning"),
    (["--lora-rank", "8", "--lora-init", "svd"], "--lora-init must be one of kaiming, gaussian, pissa"),
    (["--best-metric", "rouge1"], "--best-metric rouge1 needs ROUGE during training: add --eval-rouge N"),
    (["--data", "/no/such/dialogsum"], "data not found: /no/such/dialogsum"),
    (["--model", "/no/such/model"], "model not found: /no/such/model"),
    (["--resume", "/tmp"], "--resume /tmp: no checkpoint there"),
])
def test_bad_values_for_train(tiny, tmp_path, flags, message):
    base = ["--config", SMOKE, "--model", tiny, "--data", CORPUS, "--output-dir", str(tmp_path / "o")]
    if "--resume" in flags:
        base = []
    _fails([TRAIN, *base, *flags], message)


@pytest.mark.slow
def test_unknown_config_key_names_key_and_file(tmp_path):
    cfg = tmp_path / "my.toml"
    cfg.write_text('lr = 1e-3\nlora_rnak = 8\n')
    _fails([TRAIN, "--config", str(cfg)], f"{cfg}: unknown config key 'lora_rnak'; did you mean 'lora_rank'?")
    cfg.write_text('lr = "fast"\n')
    _fails([TRAIN, "--config", str(cfg)], f"{cfg}: lr: expected a number, got 'fast'")


@pytest.mark.slow
@pytest.mark.parametrize("line,message", [
    ("lora_rank = 8.9", "lora_rank: expected an integer, got 8.9"),
    ("overwrite = 'false'", "overwrite: expected true or false, got 'false'"),
    ("model = 3", "model: expected a string, got 3"),
    ("batch_size = true", "batch_size: expected an integer, got True"),
    ("lora_targets = 'q'", "lora_targets: expected a list, got 'q'"),
])
def test_config_values_must_have_their_field_type(tmp_path, line, message):
    cfg = tmp_path / "typed.toml"
    cfg.write_text(line + "\n")
    _fails([TRAIN, "--config", str(cfg)], f"{cfg}: {message}")


def test_config_false_stays_false(tmp_path):
    from dialsum_raw.config import read_config
    cfg = tmp_path / "flags.toml"
    cfg.write_text("overwrite = false\nrslora = false\nlr = 1\n")
    assert read_config(str(cfg)) == {"overwrite": False, "rslora": False, "lr": 1.0}


@pytest.mark.slow
def test_not_a_model_and_corrupted_weights(tiny, tmp_path):
    _fails([TRAIN, "--config", SMOKE, "--model", str(tmp_path), "--output-dir", str(tmp_path / "o")],
           f"{tmp_path} is not a model folder (no config.json)")
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", tiny, str(broken)], check=True)
    w = broken / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    _fails(
        [
            TRAIN,
            "--config",
            SMOKE,
            "--model",
            str(broken),
            "--data",
            CORPUS,
            "--output-dir",
            str(tmp_path / "o"),
        ],
        f"cannot load model from {broken}",
    )


@pytest.mark.slow
def test_bad_data_file_through_train(tiny, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.csv").write_text("id,dialogue,summary,topic\ntrain_0,hello,,x\n")
    (folder / "validation.csv").write_text("id,dialogue,summary,topic\ndev_0,hi,there,x\n")
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
            str(tmp_path / "o"),
        ],
        f"{folder / 'train.csv'}:2: empty summary",
    )


@pytest.mark.slow
def test_existing_output_dir_refused_before_any_work(tmp_path):
    (tmp_path / "notes.txt").write_text("precious")
    # the model path is bogus too: the output dir must be the first thing checked
    _fails([TRAIN, "--config", SMOKE, "--model", "/no/model", "--output-dir", str(tmp_path)],
           f"output dir {tmp_path} already exists and is not empty; pass --overwrite")
    _fails([TRAIN, "--config", SMOKE, "--model", "/no/model", "--output-dir", str(tmp_path), "--overwrite"],
           "--overwrite refuses to delete")
    assert (tmp_path / "notes.txt").read_text() == "precious"
    assert os.listdir(tmp_path) == ["notes.txt"]  # no lock file left in a folder that was never the run's
    _fails([EVAL, "--base", "/no/model", "--data", CORPUS, "--output-dir", str(tmp_path)], "already exists")


@pytest.mark.slow
def test_adapter_for_another_base_through_evaluate(tiny, small, tmp_path):
    model = load_model(tiny)
    lora.inject(model, lora.LoRAConfig(("q", "v"), rank=4, alpha=8))
    lora.save_adapter(model, tmp_path / "ad", base_model="tiny")
    _fails([EVAL, "--base", small, "--adapter", str(tmp_path / "ad"), "--data", CORPUS, "--output-dir",
            str(tmp_path / "e"), "--limit", "1"], "does not fit this base model")
    assert not (tmp_path / "e").exists()


@pytest.mark.slow
def test_corrupted_trainer_state_on_resume(tiny, tmp_path):
    out = tmp_path / "run"
    subprocess.run(
        [
            sys.executable,
            TRAIN,
            "--config",
            SMOKE,
            "--model",
            tiny,
            "--data",
            CORPUS,
            "--output-dir",
            str(out),
            "--max-steps",
            "2",
            "--eval-every",
            "2",
            "--subsample",
            "100",
        ],
        check=True,
        capture_output=True,
    )
    state = out / "last" / checkpoint.TRAINER_STATE
    state.write_bytes(state.read_bytes()[:1000])
    _fails([TRAIN, "--resume", str(out)], "truncated or corrupted checkpoint")


@pytest.mark.slow
@pytest.mark.parametrize("eval_every", [1, 1000], ids=["saved", "none-saved"])
def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(tiny, tmp_path, eval_every):
    """lr 1e9 diverges within a few steps. Validated (and saved) at every step, last/ is the step before;
    with no validation or save due, there is no last/, and the message must not point at one (issue 29)."""
    out = tmp_path / "run"
    last = _fails(
        [
            TRAIN,
            "--config",
            SMOKE,
            "--model",
            tiny,
            "--data",
            CORPUS,
            "--output-dir",
            str(out),
            "--subsample",
            "100",
            "--max-steps",
            "20",
            "--eval-every",
            str(eval_every),
            "--warmup-ratio",
            "0",
            "--lr",
            "1e9",
            "--clip",
            "0",
        ],
        "training diverged",
    )
    step = int(last.split(" at step ")[1].split(":")[0])
    if eval_every == 1000:
        assert f"no checkpoint was saved before it ({out / 'last'} is written at each validation" in last
        assert "last good checkpoint" not in last and not (out / "last").exists()
        return
    assert step >= 2 and f"the last good checkpoint is {out / 'last'}, step {step - 1}" in last
    kept = checkpoint.load_state(str(out / "last"))
    assert kept["step"] == step - 1
    load_model(str(out / "last"))  # loadable


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["sigint", "sigterm"])
def test_signal_saves_last_and_exits(tiny, tmp_path, sig, code):
    """No validation or periodic save is due: the signal alone must write last/ at the step it stopped on.
    The run starts with SIGINT ignored, as from a background script, and must still see it."""
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            TRAIN,
            "--config",
            SMOKE,
            "--model",
            tiny,
            "--data",
            CORPUS,
            "--output-dir",
            str(out),
            "--max-steps",
            "400",
            "--eval-every",
            "1000",
            "--log-every",
            "1",
            "--lora-rank",
            "4",
            "--lr",
            "1e-3",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=zygote.ignore_sigint,  # as a shell starts a background job
    )
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(sig)
    time.sleep(0.02)
    proc.send_signal(sig)  # torchrun forwards what the terminal already sent: one request, not two
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code and "Traceback" not in err, err[-2000:]
    found = checkpoint.find(str(out / "last"))
    step = checkpoint.load_state(found)["step"]
    assert 1 <= step < 400 and f"stopped by signal {int(sig)} at step {step}" in err
    assert f"python train.py --resume {out}" in err
    lora.load_adapter(load_model(tiny), found)


@pytest.mark.slow
def test_pickled_code_in_trainer_state_is_refused_and_never_runs(tiny, tmp_path):
    out = tmp_path / "run"
    subprocess.run(
        [
            sys.executable,
            TRAIN,
            "--config",
            SMOKE,
            "--model",
            tiny,
            "--data",
            CORPUS,
            "--output-dir",
            str(out),
            "--max-steps",
            "2",
            "--eval-every",
            "2",
            "--subsample",
            "100",
        ],
        check=True,
        capture_output=True,
    )
    marker = tmp_path / "payload-ran"
    state = torch.load(out / "last" / checkpoint.TRAINER_STATE, weights_only=True)
    state["step"] = _Payload(str(marker))
    torch.save(state, out / "last" / checkpoint.TRAINER_STATE)
    _fails([TRAIN, "--resume", str(out)], "refused: it asks to load the Python object")
    assert not marker.exists()


class _Payload:
    """Unpickling this runs `touch` on a marker file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.slow
def test_show_outside_evaluated_dialogues(tiny, tmp_path):
    _fails([EVAL, "--base", tiny, "--data", CORPUS, "--output-dir", str(tmp_path / "e"), "--limit", "3",
            "--show", "1,5"], "--show 5 is out of range: 3 test dialogues are evaluated")

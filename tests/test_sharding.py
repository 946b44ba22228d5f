"""--fsdp on 2 gloo processes against its references: 1 process with the same global batch (dropout off),
2-process DDP (dropout on: each rank draws its own masks, so no N-process run can equal 1 process), the
uninterrupted run (SIGKILL, then --resume), and evaluate.py on its best/."""

import csv
import os
import subprocess
import sys

import pytest

from conftest import (CORPUS, REPO, ckpt_weights, max_diff, metric_lines, mode_flags, ranks, ranks_killed,
                      train_cmd, two_process_cmd)
from dialsum_raw import checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "mica"])
def test_fsdp_equals_one_process_with_the_same_global_batch(tiny, tmp_path, mode):
    """Dropout off: 2 processes x batch 4 with --fsdp take the steps of 1 process x batch 8, with accumulation
    (FSDP reduces each micro-batch) and clipping (the total norm over shards); the LoRA run (MiCA, whose
    frozen B is part of the adapter and must be gathered too) also recomputes its blocks
    (--gradient-checkpointing). Validation and its ROUGE run on the gathered weights and equal one
    process's. last/ holds the optimizer as DCP shards, best/ not."""
    common = [
        "--max-steps",
        "4",
        "--dropout",
        "0",
        "--grad-accum",
        "2",
        "--eval-every",
        "4",
        "--eval-rouge",
        "6",
        "--max-new-tokens",
        "12",
        *mode_flags(mode, "0"),
    ]
    subprocess.run(
        train_cmd(tiny, tmp_path / "one", "--batch-size", "8", *common), check=True, capture_output=True
    )
    ranks(train_cmd(tiny, tmp_path / "two", "--batch-size", "4", "--fsdp", *common,
                    *["--gradient-checkpointing"] * (mode == "mica")))
    assert max_diff(ckpt_weights(tmp_path / "one" / "last"), ckpt_weights(tmp_path / "two" / "last")) <= 1e-5
    one, two = metric_lines(tmp_path / "one"), metric_lines(tmp_path / "two")
    assert [m["tokens"] for m in one] == [m["tokens"] for m in two]
    assert {k: one[-1][k] for k in ("rouge1", "rouge2", "rougeL")} == {
        k: two[-1][k] for k in ("rouge1", "rouge2", "rougeL")
    }
    assert abs(one[-1]["val_loss"] - two[-1]["val_loss"]) <= 1e-5
    shards = tmp_path / "two" / "last" / checkpoint.OPTIMIZER_SHARDS
    assert sorted(os.listdir(shards)) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (tmp_path / "two" / "best" / checkpoint.OPTIMIZER_SHARDS).exists()
    assert sorted(os.listdir(tmp_path / "two" / "best")) == sorted(os.listdir(tmp_path / "one" / "best"))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_fsdp_equals_ddp_with_dropout_on(two_process, mode):
    fsdp, ddp = two_process(mode, "fsdp"), two_process(mode, "ddp")
    assert max_diff(ckpt_weights(ddp / "last"), ckpt_weights(fsdp / "last")) <= 1e-5
    assert max_diff(ckpt_weights(ddp / "best"), ckpt_weights(fsdp / "best")) <= 1e-5


@pytest.mark.slow
def test_fsdp_resume_after_sigkill_matches_uninterrupted(tiny, tmp_path, two_process):
    """Full fine-tuning, dropout on: the weights, every rank's optimizer shard and RNG come back exactly."""
    killed = tmp_path / "killed"
    state = ranks_killed(two_process_cmd(tiny, killed, "full", "fsdp"), killed)
    assert 0 < state["step"] < 8 and state["optimizer"]["sharded"] == checkpoint.OPTIMIZER_SHARDS
    ranks([sys.executable, os.path.join(REPO, "train.py"), "--resume", str(killed)])
    assert max_diff(ckpt_weights(two_process("full", "fsdp") / "last"), ckpt_weights(killed / "last")) <= 1e-6
    assert checkpoint.load_state(str(killed / "last"))["step"] == 8


@pytest.mark.slow
def test_fsdp_is_refused_alone_and_at_another_world_size(tiny, tmp_path, two_process):
    """Without torchrun there is nothing to shard over; a 2-process --fsdp checkpoint resumes only on 2."""
    res = subprocess.run(train_cmd(tiny, tmp_path / "alone", "--fsdp"), capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith(
        "error: --fsdp shards the model over processes: start it with torchrun")
    status, output = ranks([sys.executable, os.path.join(REPO, "train.py"), "--resume",
                            str(two_process("lora", "fsdp"))], nproc=3, check=False)
    assert status != 0 and "would change its data order or schedule: processes 2 -> 3" in output


def _summaries(tiny, tmp_path, name, instruct, adapter):
    out = tmp_path / name
    subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "evaluate.py"),
            "--base",
            tiny,
            "--instruct",
            str(instruct),
            "--adapter",
            str(adapter),
            "--data",
            CORPUS,
            "--split",
            "test",
            "--output-dir",
            str(out),
            "--limit",
            "4",
            "--batch-size",
            "4",
            "--num-beams",
            "2",
            "--max-new-tokens",
            "12",
        ],
        check=True,
        capture_output=True,
        cwd=REPO,
    )
    with open(out / "results.csv", newline="") as f:
        return [(r["instruct_model_summaries"], r["peft_model_summaries"]) for r in csv.DictReader(f)]


@pytest.mark.slow
def test_fsdp_best_scores_through_evaluate_as_ddp_best(tiny, tmp_path, two_process):
    """best/ of a --fsdp run is an ordinary model (or adapter) folder: evaluate.py loads it and writes the
    summaries of the DDP run's best/."""
    fsdp = _summaries(
        tiny, tmp_path, "fsdp", two_process("full", "fsdp") / "best", two_process("lora", "fsdp") / "best"
    )
    ddp = _summaries(
        tiny, tmp_path, "ddp", two_process("full", "ddp") / "best", two_process("lora", "ddp") / "best"
    )
    assert fsdp == ddp and len(fsdp) == 12


def test_optimizer_shards_load_tensors_only_and_refuse_pickled_code(tmp_path):
    """DCP reads .metadata with pickle and non-tensor items with torch.load(weights_only=False); the reader
    used on resume allows only DCP's record classes in the metadata and tensors in the shards."""
    import os as os_module
    import pickle

    import torch
    import torch.distributed.checkpoint as dcp
    from dialsum_raw.errors import UserError
    from dialsum_raw.optimizer_shards import read_shards

    saved = {"exp_avg": torch.arange(6.0).reshape(2, 3), "step": torch.tensor(3.0)}
    dcp.save(saved, checkpoint_id=str(tmp_path / "ok"), no_dist=True)
    loaded = {k: torch.zeros_like(v) for k, v in saved.items()}
    read_shards(loaded, str(tmp_path / "ok"))
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)

    dcp.save({"lr": 0.5}, checkpoint_id=str(tmp_path / "object"), no_dist=True)  # stored pickled
    with pytest.raises(UserError, match="refused: lr is a pickled object, not a tensor"):
        read_shards({"lr": 0.0}, str(tmp_path / "object"))

    class Exploit:
        def __reduce__(self):
            return os_module.system, ("touch " + str(tmp_path / "pwned"),)

    (tmp_path / "ok" / ".metadata").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(
        UserError, match=r"refused: the metadata asks to load the Python object (posix|os)\.system"
    ):
        read_shards(loaded, str(tmp_path / "ok"))
    assert not (tmp_path / "pwned").exists()

"""The GPU check (`python -m dialsum_raw.bench gpu`) run as its own dry run on CPU.

The full dry run, `--device cpu --quick` with the flan-t5-small stand-in, takes minutes here (HF's
Trainer rows and two torchrun launches dominate), too slow for the suite. This test runs the cheapest
meaningful slice: the command itself on the tiny model, three of the five parts for real, and `train`
and `ddp` replaced by parts that fail, so the record of a failed part is checked too. What those two parts
check is tested elsewhere: the trainer comparison in `bench train`, DDP against 1 process in test_training's
2-process test, and torchrun itself in test_hardening's stalled-rank test."""

import json

import pytest
import torch

from conftest import CORPUS, FLAN
from dialsum_raw import bench, gpucheck
from dialsum_raw.errors import UserError


@pytest.mark.slow
def test_dry_run_records_every_part_and_what_failed(tiny, corpus, tmp_path, monkeypatch):
    def fails(args, device, tmp):
        raise RuntimeError("a traceback's first line\nthe line that says why")
    monkeypatch.setitem(gpucheck.PARTS, "train", fails)
    monkeypatch.setitem(gpucheck.PARTS, "ddp", fails)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # --device cpu sets it; restored after the test
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(UserError, match="train, ddp failed"):  # the command still fails at the end
            bench.main(
                [
                    "gpu",
                    "--device",
                    "cpu",
                    "--quick",
                    "--model",
                    tiny,
                    "--data",
                    CORPUS,
                    "--config",
                    FLAN,
                    "--out",
                    str(tmp_path),
                ]
            )
    finally:
        torch.set_num_threads(threads)

    result = json.load(open(tmp_path / "bench-gpu.json"))
    parts = result["parts"]
    assert result["device"].startswith("cpu") and list(parts) == ["steps", "train", "epoch", "beams", "ddp"]
    for name in ("train", "ddp"):
        assert parts[name]["error"] == "RuntimeError: the line that says why"
    assert parts["steps"]["steps"] == 4 and parts["steps"]["real_tokens_per_s"] > 0
    # one epoch of every 400th training dialogue: the sampler's full batches of 8, each one step
    assert parts["epoch"]["steps"] == len(corpus["train"][::400]) // 8 and parts["epoch"]["goal_met"] is None
    beams = parts["beams"]
    assert beams["dialogues"] == 4
    # on CPU in fp32 both engines agree, and a summary does not depend on its batch: what CUDA is checked for
    assert set(beams["fp32"]["identical"].values()) == {4} and beams["fp32"]["max_score_gap_own_vs_hf"] == 0
    assert len(beams["bf16"]["identical"]) == 4 and all(t > 0 for t in beams["bf16"]["seconds"].values())
    assert all(p["part_seconds"] >= 0 for p in parts.values())

"""`python -m dialsum_raw.bench gpu`: what only a GPU can show, in one command sized for about 5 minutes
on one GPU.

Five parts, one table, bench-gpu.json with the device's name:

  steps  200 steps of bf16 LoRA r=8 (q, v) on the flan-t5-small stand-in: real tokens/s, peak memory
  train  the `bench train --quick` rows (ours against HF's Trainer, MFU against a peak sized to the device)
  epoch  one epoch of LoRA on DialogSum train (configs/quick-lora.toml's recipe) on the stand-in, timed:
         the goal is <= 30 s on an H100/H200-class GPU
  beams  own against HF beam search on 32 test dialogues, fp32 and bf16, all in one batch and one at a
         time: identical summaries counted. On CPU fp32 gives identical summaries everywhere; on CUDA the
         kernels are chosen by tensor shape, which batch size, padding and finished dialogues change, so
         "a summary does not depend on its batch" and "own equals HF" are measured here, not assumed
  ddp    (>= 2 GPUs) 2 nccl processes x batch 4 against 1 process x batch 8, dropout off: the weights

`--device cpu` runs it on the CPU (gloo for ddp) and `--quick` takes a few steps of each part: together
a dry run of the whole command. A part that fails is recorded with its error and the others still run.
"""

import copy
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
import traceback

import torch
from safetensors.torch import load_file

from . import beam, data, training
from .config import Settings, validate
from .errors import Stopped, UserError
from .measure import lora_settings, save, table, timed_ids
from .modeling import choose_precision, compute_device, load_model, load_tokenizer
from .trainbench import bench_train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCH_GOAL_SECONDS = 30


def part_steps(args, device, tmp):
    """Our loop, 200 steps (quick: 4) of bf16 LoRA, batch 8: throughput and the CUDA allocator's peaks."""
    s = lora_settings(args, os.path.join(tmp, "steps"), 4 if args.quick else 200, precision="bf16")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    summary = training.train(s)
    out = {
        "steps": summary["steps"],
        "seconds": summary["seconds"],
        "real_tokens_per_s": summary["tokens_per_second"],
        "precision": summary["precision_reason"],
    }
    if device.type == "cuda":
        out.update(peak_allocated_mb=round(torch.cuda.max_memory_allocated() / 2 ** 20),
                   peak_reserved_mb=round(torch.cuda.max_memory_reserved() / 2 ** 20))
    return out


def part_train(args, device, tmp):
    """bench train's --quick rows (quick here: 1 step per row); it prints its own table and saves
    bench-train.json."""
    quick = copy.copy(args)
    quick.quick, quick.steps = True, 1 if args.quick else None
    result = bench_train(quick)
    return {
        k: result[k]
        for k in (
            "steps",
            "matmul_peak_gflops",
            "ours_auto_over_ours_fp32",
            "ours_over_hf_best_same_precision",
        )
    } | {
        "rows": {
            r["row"]: {k: r[k] for k in ("real_tokens_per_s", "vs_hf_best", "mfu")} for r in result["rows"]
        }
    }


def part_epoch(args, device, tmp):
    """One epoch of configs/quick-lora.toml's LoRA (batch 8, lr 1e-3, r=8 on q, v) over all of DialogSum
    train, precision auto, validated once at its end. quick: every 400th dialogue."""
    s = dataclasses.replace(lora_settings(args, os.path.join(tmp, "epoch"), 1), max_steps=0, epochs=1,
                            subsample=400 if args.quick else 1, eval_every=0, log_every=100)
    validate(s)
    start = time.perf_counter()
    summary = training.train(s)
    return {
        "batch_size": s.batch_size,
        "steps": summary["steps"],
        "loop_seconds": summary["seconds"],
        "wall_seconds": round(time.perf_counter() - start, 1),
        "real_tokens_per_s": summary["tokens_per_second"],
        "precision": summary["precision"],
        "goal_seconds": EPOCH_GOAL_SECONDS,
        "goal_met": None if args.quick else summary["seconds"] <= EPOCH_GOAL_SECONDS,
    }


def part_beams(args, device, tmp):
    """Both engines on the same dialogues, at batch n and one at a time, fp32 and bf16: seconds, and how
    many summaries are identical between engines and between batch sizes. The fp32 disagreements of own
    and HF are scored: a gap under 1e-4 is a tie either search may break either way."""
    n, tokens = (4, 8) if args.quick else (32, 64)
    model, tok = load_model(args.model).eval().to(device), load_tokenizer(args.model)
    texts = [d.dialogue for d in data.load_splits(args.data, ("test",))["test"][:n]]
    out = {"dialogues": n, "max_new_tokens": tokens, "num_beams": 4}
    for precision in ("fp32", "bf16"):
        ids, seconds = {}, {}
        for size in (n, 1):
            for engine in ("own", "hf"):
                s = Settings(engine=engine, eval_batch_size=size, precision=precision, num_beams=4,
                             max_new_tokens=tokens)
                seconds[engine, size], ids[engine, size] = timed_ids(model, tok, texts, s)
        same = lambda a, b: sum(x == y for x, y in zip(ids[a], ids[b]))
        out[precision] = {"seconds": {f"{e} batch {b}": round(t, 2) for (e, b), t in seconds.items()},
                          "identical": {f"own vs hf, batch {n}": same(("own", n), ("hf", n)),
                                        "own vs hf, one at a time": same(("own", 1), ("hf", 1)),
                                        f"own batch {n} vs one at a time": same(("own", n), ("own", 1)),
                                        f"hf batch {n} vs one at a time": same(("hf", n), ("hf", 1))}}
        if precision == "fp32":
            sources, _ = data.encode_sources(tok, texts, Settings().max_source_len)
            gaps = beam.score_gaps(model, sources, ids["own", n], ids["hf", n], 1.0)
            out[precision]["max_score_gap_own_vs_hf"] = max(gaps.values(), default=0.0)
    return out


def part_ddp(args, device, tmp):
    """train.py in 1 process x batch 8 and in 2 processes x batch 4 (torchrun; nccl on GPUs, gloo on CPU),
    fp32, dropout off, the same steps: the largest difference of any LoRA weight afterwards, also as a
    share of lr x steps, the most AdamW moves a weight (so rounding shows as a small share)."""
    gpus = torch.cuda.device_count()
    if device.type == "cuda" and gpus < 2:
        return {"skipped": f"needs 2 GPUs, {gpus} visible"}
    steps, lr = (2 if args.quick else 20), 1e-3
    env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if device.type == "cpu" else {})}
    weights = {}
    for procs, batch in ((1, 8), (2, 4)):
        out = os.path.join(tmp, f"ddp-{procs}")
        cmd = [os.path.join(REPO, "train.py"), "--config", os.path.join(REPO, "configs", "quick-lora.toml"),
               "--model", args.model, "--data", args.data, "--output-dir", out, "--batch-size", str(batch),
               "--max-steps", str(steps), "--eval-every", str(steps), "--log-every", str(steps),
               "--subsample", "40" if args.quick else "10",
               "--lr", str(lr), "--dropout", "0", "--lora-dropout", "0", "--precision", "fp32"]
        launch = (
            ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if procs == 2 else []
        )
        done = subprocess.run([sys.executable, *launch, *cmd], env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{procs}-process train.py exited {done.returncode}:\n{done.stderr[-3000:]}")
        weights[procs] = load_file(os.path.join(out, "last", "adapter.safetensors"))
    if weights[1].keys() != weights[2].keys():
        raise RuntimeError(
            f"the adapters hold different tensors: {sorted(weights[1].keys() ^ weights[2].keys())[:2]}"
        )
    diff = max((weights[1][k] - weights[2][k]).abs().max().item() for k in weights[1])
    return {
        "backend": "nccl" if device.type == "cuda" else "gloo",
        "steps": steps,
        "lr": lr,
        "max_weight_diff": diff,
        "share_of_lr_x_steps": diff / (lr * steps),
    }


PARTS = {"steps": part_steps, "train": part_train, "epoch": part_epoch, "beams": part_beams, "ddp": part_ddp}


def _rows(parts):
    """The summary table: one or more lines per part."""
    rows = []
    for name, r in parts.items():
        if "error" in r:
            rows.append((name, f"FAILED: {r['error']}"))
        elif "skipped" in r:
            rows.append((name, f"skipped: {r['skipped']}"))
        elif name == "steps":
            memory = (
                f", peak {r['peak_allocated_mb']:,} MB allocated / {r['peak_reserved_mb']:,} MB reserved"
                if "peak_allocated_mb" in r
                else ""
            )
            rows.append((name, f"{r['steps']} steps bf16 LoRA: {r['real_tokens_per_s']:,.0f} real tok/s "
                               f"({r['seconds']} s){memory}"))
        elif name == "train":
            rows += [
                (
                    f"train: {row}",
                    f"{v['real_tokens_per_s']:>8,.0f} real tok/s  {v['vs_hf_best']:.2f}x HF best  "
                    f"MFU {v['mfu']:.1%}",
                )
                for row, v in r["rows"].items()
            ]
        elif name == "epoch":
            goal = (
                ""
                if r["goal_met"] is None
                else f" (goal <= {r['goal_seconds']} s: {'met' if r['goal_met'] else 'NOT met'})"
            )
            rows.append(
                (
                    name,
                    f"{r['steps']} steps, {r['precision']}: {r['loop_seconds']} s in the loop{goal}, "
                    f"{r['wall_seconds']} s with loading; {r['real_tokens_per_s']:,.0f} real tok/s",
                )
            )
        elif name == "beams":
            n = r["dialogues"]
            for p in ("fp32", "bf16"):
                gap = f"; max score gap {r[p]['max_score_gap_own_vs_hf']:.1e}" if p == "fp32" else ""
                rows.append((f"beams {p}: identical of {n}",
                             ", ".join(f"{k} {v}" for k, v in r[p]["identical"].items()) + gap))
                rows.append(
                    (f"beams {p}: seconds", ", ".join(f"{k} {v}" for k, v in r[p]["seconds"].items()))
                )
        elif name == "ddp":
            rows.append(
                (
                    name,
                    f"{r['backend']}, {r['steps']} steps: max weight difference 2 vs 1 process "
                    f"{r['max_weight_diff']:.1e} ({100 * r['share_of_lr_x_steps']:.2g}% of lr x steps)",
                )
            )
    return rows


def run(args):
    """Every part in turn; then the table and bench-gpu.json. Exits with an error if a part failed."""
    if not torch.cuda.is_available() and args.device != "cpu":
        raise UserError("no CUDA GPU is visible; `--device cpu` runs this check on the CPU as a dry run")
    if torch.cuda.is_available() and args.device == "cpu":
        raise UserError(
            "CUDA started before --device cpu could hide it; run with CUDA_VISIBLE_DEVICES= instead"
        )
    device = compute_device()
    info = {
        "gpus": torch.cuda.device_count(),
        "cuda": torch.version.cuda,
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability()))
        if device.type == "cuda"
        else None,
        "auto_precision": " ".join(choose_precision("auto", device)),
    }
    parts = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, part in PARTS.items():
            print(f"\n== gpu check: {name}", flush=True)
            start = time.perf_counter()
            try:
                parts[name] = part(args, device, tmp)
            except Stopped:  # SIGINT / SIGTERM stop the whole check, not one part
                raise
            except Exception as e:  # the other parts still run: a GPU's time is scarce
                traceback.print_exc()
                parts[name] = {"error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[-1]}"}
            parts[name]["part_seconds"] = round(time.perf_counter() - start, 1)
    table(f"gpu check on {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}"
           f"{' (--quick)' if args.quick else ''}; {info['auto_precision']}", _rows(parts))
    result = save("gpu", {**info, "parts": parts}, args)
    failed = [name for name, r in parts.items() if "error" in r]
    if failed:
        raise UserError(
            f"gpu check: {', '.join(failed)} failed (tracebacks above; bench-gpu.json has the rest)"
        )
    return result

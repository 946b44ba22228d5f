"""Benchmarks: figures measured side by side in one run, printed as tables and saved as bench-*.json.

    python -m dialsum_raw.bench train   [--quick]   # our loop (torch/fast dropout) vs HF Seq2SeqTrainer +
    peft; long pool; MFU
    python -m dialsum_raw.bench eval    [--quick]   # own beam search vs HF generate and CTranslate2, batch
    1/8/16/32
    python -m dialsum_raw.bench memory  [--quick]   # peak memory per size, +- checkpointing; adapter size;
                                                    # full fine-tuning at 2 processes, DDP vs --fsdp (--only
                                                    sharding); # the base stored fp32 / bf16 / nf4 (--only
                                                    base-dtype)
    python -m dialsum_raw.bench block   [--size large]  # one T5 block, fwd+bwd, base fp32 / bf16 / nf4
    python -m dialsum_raw.bench step    [--size large]  # one whole LoRA step, base fp32 / bf16 / nf4
    python -m dialsum_raw.bench learn   [--quick]   # tiny T5 from scratch: loss curve, ROUGE vs baselines
    python -m dialsum_raw.bench gpu     [--quick] [--device cpu]  # the GPU check, ~5 min (gpucheck.py)

Models are random-weight stand-ins built from --config (flan-t5-small's exact shape; --tiny for
learn), data is the real DialogSum corpus from --data. bf16 autocast runs wherever --precision auto
picks it (CUDA; CPUs with AMX or AVX512-BF16).
"""

import argparse
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from functools import partial

import torch
from torch.distributed.tensor import DTensor

from . import beam, data, gpucheck, lora, metrics, sharding, standin, training
from .config import Settings, validate
from .errors import run_cli
from .generation import generation_kwargs, length_sorted_batches, summarize
from .measure import bare_steps, consumed, lora_settings, machine, save, table, timed_ids
from .modeling import (BASE_DTYPES, autocast_for, choose_precision, compute_device, count_parameters,
                       load_model, load_tokenizer, stored_bytes)
from .trainbench import bench_train


def _ct2_serve(conn, path, threads):
    """CTranslate2's side of the race, in a process of its own: fp32 and int8 translators of the converted
    folder answer (kind, batches, options) with (seconds spent translating, best hypothesis per source),
    or with the error's text."""
    try:
        import ctranslate2

        translators = {
            kind: ctranslate2.Translator(path, device="cpu", compute_type=kind, intra_threads=threads)
            for kind in ("float32", "int8")
        }
        for kind, batches, options in iter(conn.recv, None):
            start = time.perf_counter()
            hypotheses = [r.hypotheses[0] for batch in batches
                          for r in translators[kind].translate_batch(batch, **options)]
            conn.send((time.perf_counter() - start, hypotheses))
    except Exception:  # noqa: BLE001 - the parent raises it
        import traceback
        conn.send(traceback.format_exc())


class _CT2:
    """CTranslate2 (fp32, int8) in a child process, so that its threads and torch's never run in one process.
    Run in ours, once it had run, torch's threads slept between ops (two OpenMP runtimes: 70,000 context
    switches in a search instead of 30, ours bf16 7.5 s before it ran and 10.9 s after), a cost no user of
    either engine pays."""

    def __init__(self, model_dir, tmp):
        from ctranslate2.converters import TransformersConverter
        path = TransformersConverter(model_dir).convert(os.path.join(tmp, "ct2"))
        context = multiprocessing.get_context("spawn")  # not fork: no copy of torch's thread pool
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=_ct2_serve, args=(child, path, torch.get_num_threads()), daemon=True
        )
        self.process.start()
        child.close()  # the child's end lives in the child only: its exit reads as end-of-file here

    def close(self):
        try:
            self.conn.send(None)
        except OSError:  # the child has already ended
            pass
        self.process.join(30)
        self.process.terminate()

    def ids(self, kind, tok, texts, settings):
        """(seconds, token ids) of CTranslate2's beam search over the batches generate_ids forms (sorted by
        source length), with the same beams, cap and length penalty; EOS kept when reached. The seconds are
        tokens to strings and back here plus the translating there, not the transfer between the processes."""
        start = time.perf_counter()
        sources, _ = data.encode_sources(tok, texts, settings.max_source_len)
        chunks = length_sorted_batches(sources, settings.eval_batch_size)
        batches = [[tok.convert_ids_to_tokens(sources[i]) for i in chunk] for chunk in chunks]
        here = time.perf_counter() - start
        try:
            self.conn.send(
                (
                    kind,
                    batches,
                    {
                        "beam_size": settings.num_beams,
                        "length_penalty": settings.length_penalty,
                        "max_decoding_length": settings.max_new_tokens,
                        "return_end_token": True,
                    },
                )
            )
            answer = self.conn.recv()
        except (EOFError, OSError):  # the child is gone: its end of the pipe closed
            self.process.join(5)
            raise RuntimeError(f"the CTranslate2 process ended (exit code {self.process.exitcode})") from None
        if isinstance(answer, str):
            raise RuntimeError(f"CTranslate2 failed in its process:\n{answer}")
        there, hypotheses = answer
        start = time.perf_counter()
        ids = [None] * len(texts)
        for i, tokens in zip([i for chunk in chunks for i in chunk], hypotheses):
            ids[i] = tok.convert_tokens_to_ids(tokens)
        return here + there + time.perf_counter() - start, ids


def _ct2(model_dir, tmp):
    """A _CT2 of the model folder (a LoRA adapter is merged into a folder first: python -m dialsum_raw.lora
    merge), or None without ctranslate2."""
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        print("CTranslate2 rows skipped: pip install -e '.[bench]' (or pip install ctranslate2) to add them")
        return None
    return _CT2(model_dir, tmp)


def bench_eval(args):
    """Every engine on the same dialogues, batch size by batch size, engines alternated within each size
    (and the sweep repeated --repeat times, best kept) so a noisy neighbour hits all: ours (fp32, bf16
    where the CPU multiplies it, and the int8 preview), HF generate, and CTranslate2 fp32 and int8 when
    installed. Outputs are compared with ours in fp32; the goals of issue 22 are checked at the end."""
    n, steps = (8, 16) if args.quick else (32, 64)
    args.repeat = args.repeat or 1
    sizes = (1, 8) if args.quick else (1, 8, 16, 32)
    device = compute_device()
    precisions = (
        ("fp32", "bf16") if choose_precision("auto", device)[0] == "bf16" else ("fp32",)
    )  # native bf16 only
    model, tok = load_model(args.model).eval().requires_grad_(False).to(device), load_tokenizer(args.model)
    split = data.load_splits(args.data, ("test",))["test"][:n]
    texts, refs = [d.dialogue for d in split], [d.refs for d in split]

    def settings(engine, size, precision="fp32", tokens=steps, **over):
        return Settings(
            engine=engine,
            eval_batch_size=size,
            precision=precision,
            num_beams=4,
            max_new_tokens=tokens,
            **over,
        )
    sources, _ = data.encode_sources(tok, texts, settings("own", 1).max_source_len)
    with tempfile.TemporaryDirectory() as tmp:
        ct2 = _ct2(args.model, tmp) if device.type == "cpu" else None
        try:  # the child stops, and then the converted model goes, whatever happened
            runs = _engines(model, tok, texts, settings, precisions, ct2, device)
            seconds, ids = _race(runs, sizes, args.repeat, model, tok, texts, settings, ct2)
        finally:
            if ct2:
                ct2.close()

    differ, why = _agreement(model, sources, ids, runs, sizes)
    best = {name: min(sizes, key=lambda b: seconds[name, b]) for name in runs}
    ours = min(
        (name for name in runs if name in ("ours fp32", "ours bf16")), key=lambda k: seconds[k, best[k]]
    )
    top = seconds[ours, best[ours]]
    int8_rouge = _int8_rouge(tok, ids, refs, sizes[-1]) if "ours int8" in runs else {}
    # the random stand-in never ends early: every dialogue runs to the cap, an upper bound
    estimate = {} if args.quick else _estimate(model, tok, texts, settings, precisions, best)
    goals = _goals(seconds, sizes, n, ours, best, top, ct2 is not None)
    result = {"dialogues": n, "generation": generation_kwargs(settings("own", 1)), "repeat": args.repeat,
              "seconds": {f"{name} batch {b}": round(t, 2) for (name, b), t in seconds.items()},
              "best_batch": best, "ours_best": ours,
              "outputs_differing_from_ours_fp32": {f"{name} batch {b}": k for (name, b), k in differ.items()},
              "why_they_differ": why, "int8_rouge_difference": int8_rouge,
              "goals": goals, "test_split_estimate_own_128_tokens": estimate}
    table(f"eval: {n} test dialogues, flan-t5-small stand-in, beams 4, max_new_tokens {steps}, "
          f"{torch.get_num_threads()} threads per engine, best of {args.repeat}; seconds\n{machine()}",
          _eval_rows(runs, sizes, n, seconds, best, top, differ, why, int8_rouge, goals, estimate))
    return save("eval", result, args)


def _engines(model, tok, texts, settings, precisions, ct2, device):
    """{row name: run(batch size) -> (seconds, ids)}: ours per precision, CTranslate2's two kinds when it is
    there, HF per precision, and on a CPU ours with the int8 preview."""
    runs = {
        f"ours {p}": (lambda size, p=p: timed_ids(model, tok, texts, settings("own", size, p)))
        for p in precisions
    }
    if ct2:
        runs.update({f"CT2 {name}": (lambda size, kind=kind: ct2.ids(kind, tok, texts, settings("own", size)))
                     for name, kind in (("fp32", "float32"), ("int8", "int8"))})
    runs.update(
        {
            f"HF {p}": (lambda size, p=p: timed_ids(model, tok, texts, settings("hf", size, p)))
            for p in precisions
        }
    )
    if device.type == "cpu":
        runs["ours int8"] = lambda size: timed_ids(model, tok, texts, settings("own", size, quantize="int8"))
    return runs


def _race(runs, sizes, repeat, model, tok, texts, settings, ct2):
    """After a warm-up of each engine, every run at every size, `repeat` times: ({(name, size): the best
    seconds}, {(name, size): the ids of the last time})."""
    seconds, ids = {}, {}
    for engine in ("own", "hf"):  # warm-up: the first calls pay for page faults and allocator growth
        timed_ids(model, tok, texts[:2], settings(engine, 2, tokens=4))
    for kind in ("float32", "int8") if ct2 else ():
        ct2.ids(kind, tok, texts[:2], settings("own", 2, tokens=4))
    for _ in range(repeat):
        for size in sizes:
            for name, run in runs.items():
                took, ids[name, size] = run(size)
                seconds[name, size] = min(took, seconds.get((name, size), float("inf")))
    return seconds, ids


def _agreement(model, sources, ids, runs, sizes):
    """Outputs against ours in fp32: ({(name, size): how many differ}, {name: why}). HF must match up to
    score ties; the others are counted, with the reason."""
    differ, why = {}, {}
    for name in runs:
        gaps = {}
        for size in sizes:
            gaps.update(beam.score_gaps(model, sources, ids["ours fp32", size], ids[name, size], 1.0))
            differ[name, size] = sum(a != b for a, b in zip(ids["ours fp32", size], ids[name, size]))
        ties = sum(g < 1e-4 for g in gaps.values())
        if name == "HF fp32":
            assert ties == len(gaps), f"ours differs from HF beyond a tie: {gaps}"
        why[name] = ("same" if not gaps else f"{ties} score ties < 1e-4" if ties == len(gaps) else
                     f"{len(gaps) - ties} beyond a tie (largest score gap {max(gaps.values()):.3f}): "
                     + ("bf16 rounding" if "bf16" in name else "int8 rounding" if "int8" in name else
                        "fp32 rounding in another kernel order, amplified over 64 steps"))
    return differ, why


def _int8_rouge(tok, ids, refs, size):
    """The int8 preview's ROUGE minus fp32's at batch `size` (how much the preview's summaries cost)."""
    texts_of = lambda name: [t.strip() for t in tok.batch_decode(ids[name, size], skip_special_tokens=True)]
    scored = {name: metrics.rouge(texts_of(name), refs)["per_row"] for name in ("ours fp32", "ours int8")}
    return {k: scored["ours int8"][k] - scored["ours fp32"][k] for k in ("rouge1", "rouge2", "rougeL")}


def _estimate(model, tok, texts, settings, precisions, best):
    """Ours at 128 new tokens, at each precision's best batch, scaled to the 500 test dialogues."""
    estimate = {}
    for precision in precisions:
        size = best[f"ours {precision}"]
        took, _ = timed_ids(model, tok, texts, settings("own", size, precision, 128))
        estimate[precision] = {"batch": size, "measured_seconds": round(took, 1),
                               "test_split_minutes": round(took * 500 / len(texts) / 60, 1)}
    return estimate


def _goals(seconds, sizes, n, ours, best, top, with_ct2):
    """Issue 22's goals, {what: met}: time per dialogue flat or falling with batch; with CTranslate2, ours
    fp32 no slower than its fp32 at the largest batch and our best no slower than its best (int8)."""
    goals = {}
    per_dialogue = [seconds[ours, b] / n for b in sizes]
    goals["time per dialogue flat or falling with batch (ours best, 5% noise allowed)"] = all(
        later <= 1.05 * earlier for earlier, later in zip(per_dialogue, per_dialogue[1:]))
    if with_ct2:
        big = sizes[-1]
        goals[
            f"ours fp32 no slower than CT2 fp32 at batch {big}: "
            f"{seconds['CT2 fp32', big] / seconds['ours fp32', big]:.2f}x"
        ] = seconds["ours fp32", big] <= seconds["CT2 fp32", big]
        goals[
            f"ours best ({ours}) no slower than CT2 best (int8): "
            f"{seconds['CT2 int8', best['CT2 int8']] / top:.2f}x"
        ] = top <= seconds["CT2 int8", best["CT2 int8"]]
    return goals


def _eval_rows(runs, sizes, n, seconds, best, top, differ, why, int8_rouge, goals, estimate):
    """The eval table's rows: seconds per engine and batch, outputs against ours fp32, the goals."""
    rows = [("engine", "   ".join(f"batch {b:<3}" for b in sizes) + "   best / ours best")]
    rows += [(name, "   ".join(f"{seconds[name, b]:9.1f}" for b in sizes)
              + f"   {seconds[name, best[name]] / top:5.2f}x (batch {best[name]})") for name in runs]
    rows += [
        (f"{name} vs ours fp32", ", ".join(f"{differ[name, b]}/{n}" for b in sizes) + f" differ: {why[name]}")
        for name in runs
        if name != "ours fp32"
    ]
    if int8_rouge:
        rows += [
            (
                "ours int8 preview",
                f"{n - differ['ours int8', sizes[-1]]}/{n} summaries identical to fp32; ROUGE "
                + ", ".join(f"{k} {100 * v:+.2f}" for k, v in int8_rouge.items()),
            )
        ]
    rows += [(f"goal {'met' if ok else 'NOT MET'}", text) for text, ok in goals.items()]
    rows += [
        (
            f"{p} test split, own",
            f"{e['test_split_minutes']} min = {e['measured_seconds']} s measured on {n} "
            f"dialogues at 128 new tokens, batch {e['batch']}, x 500/{n}",
        )
        for p, e in estimate.items()
    ]
    return rows



def _probe(args, model, size):
    """The memory-probe command line after the interpreter: every probe runs in a process of its own."""
    return ["-m", "dialsum_raw.bench", "memory-probe", "--model", model, "--data", args.data,
            "--config", args.config, "--size", size]

def bench_memory(args):
    """Peak memory of LoRA training per stand-in size, with and without T5's gradient checkpointing
    (each run in its own process, so each peak is its own), and the adapter vs checkpoint size; then
    bench_sharded_memory. --only picks one of the two parts."""
    if args.only == "sharding":
        return bench_sharded_memory(args)
    if args.only == "base-dtype":
        return bench_base_dtype(args)
    sizes = ("small", "base") if args.quick else ("small", "base", "large")
    probes = [(size, "lora", gc) for size in sizes for gc in (False, True)] + [("small", "full", False)]
    runs = {}
    for size, mode, gc in probes:
        # One step: a large step takes minutes on CPU, and step 1 has the peak (the loop's first batch is
        # its longest of the first few, and AdamW's state is allocated in it).
        cmd = [sys.executable, *_probe(args, args.model, size), "--mode", mode, "--steps", "1"]
        print(f"probe: {size} {mode}{' + checkpointing' if gc else ''}", flush=True)
        out = subprocess.run(
            cmd + ["--checkpointing"] * gc, check=True, capture_output=True, text=True
        ).stdout
        runs[f"{size} {mode}{' checkpointing' if gc else ''}"] = json.loads(out.strip().splitlines()[-1])
    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(args.model)
        model.save_pretrained(os.path.join(tmp, "full"))
        lora.inject(model, lora.LoRAConfig(("q", "v"), 8, 16))
        lora.save_adapter(model, os.path.join(tmp, "adapter"), args.model)
        size = {
            name: sum(
                os.path.getsize(os.path.join(tmp, name, f)) for f in os.listdir(os.path.join(tmp, name))
            )
            for name in ("full", "adapter")
        }
    peak = "peak_cuda_mb" if torch.cuda.is_available() else "peak_rss_mb"
    result = {
        "batch_size": 8,
        "steps": 1,
        "lora": "r=8 q,v",
        "peak": peak,
        "runs": runs,
        "checkpoint_bytes": size["full"],
        "adapter_bytes": size["adapter"],
        "checkpoint_over_adapter": round(size["full"] / size["adapter"], 1),
    }
    rows = []
    for s in sizes:
        plain, gc = runs[f"{s} lora"], runs[f"{s} lora checkpointing"]
        rows.append((f"{s}: {plain['parameters']:,} parameters, {plain['trainable']:,} LoRA-trainable",
                     f"{plain[peak]:>7,.0f} MB / {gc[peak]:>7,.0f} MB with checkpointing "
                     f"({gc[peak] / plain[peak] - 1:+.0%}); {plain['seconds_per_step']:.1f} / "
                     f"{gc['seconds_per_step']:.1f} s per step"))
    full = runs["small full"]
    rows += [
        ("small, full fine-tuning (no checkpointing)", f"{full[peak]:>7,.0f} MB"),
        (
            "adapter / full checkpoint (small)",
            f"{size['adapter'] / 1e6:.2f} MB / {size['full'] / 1e6:.1f} MB "
            f"({result['checkpoint_over_adapter']:.0f}x smaller)",
        ),
    ]
    batch, source, target = runs["small lora"]["batch_shapes"][0]
    table(
        f"memory: {'peak CUDA memory' if torch.cuda.is_available() else 'peak RSS'} in one training step of "
        f"batch {batch} ({source} source, {target} target "
        f"tokens), LoRA r=8 q,v, {runs['small lora']['precision']}, random stand-ins of each flan-t5 size",
        rows,
    )
    save("memory", result, args)
    if args.only is None:
        bench_sharded_memory(args)
        bench_base_dtype(args)


def bench_base_dtype(args):
    """One LoRA step (r=8 q,v, batch 8, bf16 autocast) with the frozen base stored in fp32, bf16 and nf4, each
    in its own process that loads a saved stand-in through load_model (nf4 quantizes as it reads): peak RSS of
    the whole process, bytes of the stored weights, seconds per step and the share of it spent dequantizing;
    the small and large stand-ins (small only with --quick), and xl and xxl predicted (see _predicted)."""
    sizes = ("small",) if args.quick else ("small", "large")
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            folder = (
                args.model
                if size == "small"
                else standin.build(args.config, os.path.join(tmp, size), size=size)
            )
            for dtype in BASE_DTYPES:
                print(f"probe: {size} base {dtype}", flush=True)
                cmd = [sys.executable, *_probe(args, folder, size), "--mode", "lora", "--steps", "2",
                       "--base-dtype", dtype]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                runs[f"{size} {dtype}"] = json.loads(out.strip().splitlines()[-1])
    peak = "peak_cuda_mb" if torch.cuda.is_available() else "peak_rss_mb"
    predicted = _predicted(runs, sizes[-1], args.config)
    rows = []
    for size in sizes:
        fp32, bf16 = runs[f"{size} fp32"], runs[f"{size} bf16"]
        for dtype in BASE_DTYPES:
            r = runs[f"{size} {dtype}"]
            rows.append(
                (
                    f"{size} base {dtype}",
                    f"{r[peak]:>8,.0f} MB peak ({r[peak] / fp32[peak]:.2f}x fp32), weights "
                    f"{r['weight_bytes'] / 2**20:>7,.0f} MB; {r['seconds_per_step']:.2f} s per step "
                    f"({r['seconds_per_step'] / bf16['seconds_per_step']:.2f}x bf16 base)"
                    + (f", dequantizing {r['dequantize_share']:.0%} of it" if dtype == "nf4" else ""),
                )
            )
    rows += [
        (
            f"{size} base {dtype} (predicted)",
            f"{p['peak_mb']:>8,.0f} MB peak, weights {p['weight_bytes'] / 2**20:>7,.0f} MB",
        )
        for size, by_dtype in predicted.items()
        for dtype, p in by_dtype.items()
    ]
    table(
        "memory by base dtype: "
        f"{'peak CUDA memory' if torch.cuda.is_available() else 'peak RSS of the process'}, "
        f"one LoRA step (r=8 q,v) of batch 8, bf16 autocast, loading included; seconds: the second step",
        rows,
    )
    save("memory-base-dtype", {"runs": runs, "predicted": predicted, "peak": peak}, args)


def _predicted(runs, measured, config):
    """xl and xxl: stored weights counted exactly on the meta-device shape (quant.stored_bytes), and a peak of
    weights + the measured size's peak beyond its weights, scaled by d_model x layers (activations and LoRA
    state grow with both; the interpreter and libraries do not, so this leans high)."""
    predicted = {}
    cfg = standin.config(config, measured)
    for size in ("xl", "xxl"):
        other = standin.config(config, size)
        scale = other.d_model * other.num_layers / (cfg.d_model * cfg.num_layers)
        model = standin.skeleton(config, size)
        predicted[size] = {}
        for dtype in BASE_DTYPES:
            r, weights = runs[f"{measured} {dtype}"], stored_bytes(model, dtype, compute="bf16")
            beyond = r["peak_rss_mb"] * 2 ** 20 - r["weight_bytes"]
            predicted[size][dtype] = {
                "weight_bytes": weights,
                "peak_mb": round((weights + beyond * scale) / 2**20),
            }
    return predicted


def bench_sharded_memory(args):
    """Full fine-tuning at 2 processes under torchrun, wrapped as train.py wraps: DDP against --fsdp. Per
    rank: the bytes of parameters, gradients and AdamW state it holds (counted from its tensors) and its peak
    memory. A probe predicted not to fit in the memory free now is skipped, saying so."""
    sizes = (args.size,) if args.size else ("base",) if args.quick else ("base", "large")
    runs, skipped = {}, {}
    for size in sizes:
        parameters = count_parameters(standin.skeleton(args.config, size))[1]
        for wrapping in ("ddp", "fsdp"):
            # per rank: the state (DDP: + 4 bytes of gradient buckets; FSDP: 1/2 of it) and ~1.5 GB of
            # interpreter, data and activations
            need = 2 * (parameters * (20 if wrapping == "ddp" else 16 / 2) + 1.5e9)
            free = standin.free_bytes()
            if not torch.cuda.is_available() and free is not None and need > free:
                skipped[f"{size} {wrapping}"] = (
                    f"not run: about {need / 1e9:.0f} GB needed, {free / 1e9:.0f} GB free"
                )
                continue
            print(f"probe: {size} full fine-tuning, 2 processes, {wrapping}", flush=True)
            res = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    "--nproc_per_node",
                    "2",
                    *_probe(args, args.model, size),
                    "--sharding",
                    wrapping,
                ],
                capture_output=True,
                text=True,
            )
            ranks = [json.loads(line) for line in res.stdout.splitlines() if line.startswith('{"size"')]
            if (
                res.returncode or len(ranks) != 2
            ):  # e.g. killed for memory by the OS: say so, measure the rest
                skipped[f"{size} {wrapping}"] = f"failed (exit {res.returncode}): {res.stderr.strip()[-300:]}"
                continue
            runs[f"{size} {wrapping}"] = max(ranks, key=lambda r: r["peak_rss_mb"])  # the fuller rank
    peak = "peak_cuda_mb" if torch.cuda.is_available() else "peak_rss_mb"
    rows = []
    for name, r in runs.items():
        state = r["parameter_bytes"] + r["gradient_bytes"] + r["optimizer_bytes"]
        ddp = runs.get(name.replace("fsdp", "ddp"))
        versus = ""
        if name.endswith("fsdp") and ddp:
            ddp_state = ddp["parameter_bytes"] + ddp["gradient_bytes"] + ddp["optimizer_bytes"]
            r["state_over_ddp"] = round(state / ddp_state, 3)
            versus = f" = {r['state_over_ddp']:.2f} of DDP's (1/N = 0.50)"
        rows.append(
            (
                f"{name.replace('ddp', 'DDP').replace('fsdp', 'FSDP')}: {r['parameters']:,} parameters",
                f"params {r['parameter_bytes'] / 1e6:,.0f} + grads {r['gradient_bytes'] / 1e6:,.0f} + AdamW "
                f"{r['optimizer_bytes'] / 1e6:,.0f} = {state / 1e6:,.0f} MB{versus}; peak {r[peak]:,.0f} MB; "
                f"{r['seconds_per_step']:.1f} s per step",
            )
        )
    rows += list(skipped.items())
    shape = next(iter(runs.values()))["batch_shape"] if runs else "?"
    table(
        f"memory per rank: full fine-tuning at 2 processes, fp32, batch {shape} per rank (examples, source, "
        f"target tokens), one step, random stand-ins",
        rows,
    )
    save("memory-sharded", {"peak": peak, "runs": runs, "skipped": skipped}, args)


def _local_bytes(tensors):
    """Bytes of these tensors held by this process: a DTensor's local shard, a plain tensor whole."""
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors if t is not None)


def sharded_probe(args):
    """This rank's part of one full fine-tuning step under torchrun (DDP or FSDP, fp32); prints JSON."""
    rank, world, device = training.setup_distributed()
    tok = load_tokenizer(args.model)
    s = lora_settings(args, "", 1, max_source_len=128, max_target_len=32)
    examples, batches = consumed(s, tok)
    batch = data.Collator(tok.pad_token_id)([examples[i] for i in batches[0][rank::world]])
    model = standin.random_model(args.config, args.size)
    parameters = count_parameters(model)[1]
    model = sharding.wrap(model, args.sharding == "fsdp", world, device, "fp32")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    start = time.perf_counter()
    model(**{k: v.to(device) for k, v in batch.items()}).loss.backward()
    gradients = _local_bytes(p.grad for p in model.parameters())
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    print(
        json.dumps(
            {
                "size": args.size,
                "sharding": args.sharding,
                "rank": rank,
                "parameters": parameters,
                "batch_shape": [*batch["input_ids"].shape, batch["labels"].shape[1]],
                "parameter_bytes": _local_bytes(model.parameters()),
                "gradient_bytes": gradients,
                "optimizer_bytes": _local_bytes(
                    t for state in optimizer.state.values() for t in state.values()
                ),
                "seconds_per_step": round(time.perf_counter() - start, 2),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
            }
        ),
        flush=True,
    )
    torch.distributed.destroy_process_group()


def memory_probe(args):
    """One size, mode and checkpointing setting in its own process, on the loop's first batches; prints
    JSON."""

    def rss_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tok = load_tokenizer(args.model)
    s = lora_settings(args, "", args.steps)
    examples, batches = consumed(s, tok)
    if args.base_dtype:
        return base_dtype_probe(args, tok, examples, batches, rss_mb)
    model = standin.random_model(args.config, args.size)
    total = count_parameters(model)[1]
    if args.mode == "lora":
        lora.inject(model, lora.LoRAConfig(("q", "v"), 8, 16, 0.05))
    if args.checkpointing:  # the call training.py makes for --gradient-checkpointing
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    device = compute_device()
    model.to(device)
    loaded = rss_mb()
    collate = data.Collator(tok.pad_token_id)
    device_batches = [collate([examples[i] for i in b]) for b in batches]
    autocast = autocast_for("auto", device)
    if (
        device.type == "cuda"
    ):  # an untimed first step sets up cuBLAS and the allocator; same batch, so the peak holds
        bare_steps(model, device_batches[:1], device, autocast)
    seconds = bare_steps(model, device_batches, device, autocast)
    print(
        json.dumps(
            {
                "size": args.size,
                "mode": args.mode,
                "checkpointing": args.checkpointing,
                "steps": args.steps,
                "precision": " ".join(choose_precision("auto", device)),
                "batch_shapes": [[*b["input_ids"].shape, b["labels"].shape[1]] for b in device_batches],
                "parameters": total,
                "trainable": count_parameters(model)[0],
                "loaded_rss_mb": round(loaded, 1),
                "peak_rss_mb": round(rss_mb(), 1),
                "seconds_per_step": round(seconds / args.steps, 2),
                "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
                "peak_cuda_reserved_mb": torch.cuda.max_memory_reserved() / 2**20
                if device.type == "cuda"
                else None,
            }
        )
    )


def base_dtype_probe(args, tok, examples, batches, rss_mb):
    """memory-probe --base-dtype: the saved stand-in loaded with that storage, LoRA r=8 q,v, bf16 autocast;
    the first batch twice: the first step has the peak, the second is timed, with the time spent in
    NF4.dequantize."""
    device = compute_device()
    model = _lora_on_base(args.model, args.base_dtype).to(device)
    batch = [data.Collator(tok.pad_token_id)([examples[i] for i in batches[0]])]
    autocast = autocast_for("bf16", device)
    bare_steps(model, batch, device, autocast)
    with _dequantizing() as spent:
        seconds = bare_steps(model, batch, device, autocast)
    print(
        json.dumps(
            {
                "size": args.size,
                "base_dtype": args.base_dtype,
                "batch_shape": [*batch[0]["input_ids"].shape, batch[0]["labels"].shape[1]],
                "parameters": count_parameters(model)[1],
                "weight_bytes": sum(
                    t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]
                ),
                "peak_rss_mb": round(rss_mb(), 1),
                "seconds_per_step": round(seconds, 3),
                "dequantize_share": round(spent[0] / seconds, 3),
                "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
            }
        )
    )


def _lora_on_base(model_dir, base_dtype):
    """The saved stand-in with its base stored as `base_dtype` stores it under bf16 compute, and LoRA r=8 on
    q, v: what the base-dtype benchmarks step."""
    model = load_model(model_dir, base_dtype=base_dtype, compute="bf16")
    lora.inject(model, lora.LoRAConfig(("q", "v"), 8, 16, 0.05, base_dtype=base_dtype))
    return model


@contextmanager
def _dequantizing(clock=time.perf_counter):
    """[seconds spent in NF4.dequantize, on `clock`] while the with-block runs."""
    from . import quant
    spent, dequantize = [0.0], quant.NF4.dequantize

    def timed(self, *a, **k):
        start = clock()
        out = dequantize(self, *a, **k)
        spent[0] += clock() - start
        return out
    quant.NF4.dequantize = timed
    try:
        yield spent
    finally:
        quant.NF4.dequantize = dequantize


def bench_block(args):
    """One T5 encoder block of --size (small unless given), forward and backward under bf16 autocast, its
    weights stored as --base-dtype fp32, bf16 and nf4 store them under bf16 compute (a frozen base: the
    gradient is the input's), at the bench's batch (8 x 320 tokens) and at 1 x 512, one thread: CPU seconds,
    the best of --repeat rounds (8) with the three interleaved, and nf4's share spent dequantizing. The blocks
    are nearly all of a step's work, and this costs seconds where one step of the large stand-in at batch 8
    costs many minutes on a CPU."""
    import copy

    from transformers.models.t5.modeling_t5 import T5Block

    from .quant import NF4Linear
    torch.set_num_threads(1)
    cfg, rounds = standin.config(args.config, args.size or "small"), args.repeat or 8
    torch.manual_seed(0)
    base = T5Block(cfg, has_relative_attention_bias=True, layer_idx=0).train().requires_grad_(False)
    blocks = {dtype: copy.deepcopy(base) for dtype in BASE_DTYPES}
    blocks["bf16"].to(torch.bfloat16)  # every weight, wo too, as from_pretrained(dtype=bfloat16) stores T5
    blocks["nf4"].to(torch.bfloat16)  # its norms, as load_model stores them under bf16 compute
    for name in [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)]:
        parent, child = name.rsplit(".", 1)
        setattr(blocks["nf4"].get_submodule(parent), child,
                NF4Linear.from_linear(base.get_submodule(name), torch.bfloat16))
    result = {"size": args.size or "small", "shapes": {}}
    for batch, tokens in ((8, 320), (1, 512)):
        x0 = torch.randn(batch, tokens, cfg.d_model)

        def step(block, dtype):
            x = x0.to(torch.float32 if dtype == "fp32" else torch.bfloat16).requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                block(x)[0].float().square().mean().backward()
        runs = {dtype: partial(step, block, dtype) for dtype, block in blocks.items()}
        result["shapes"][f"{batch}x{tokens}"] = _best_of(rounds, runs)
    _print_bases(f"one {result['size']} T5 encoder block, forward + backward, bf16 autocast, CPU s "
                 f"(best of {rounds}), 1 thread", result["shapes"])
    save("block", result, args)


def bench_step(args):
    """One LoRA training step (r=8 q,v, bf16 autocast, AdamW) of the whole stand-in of --size (small unless
    given) on the memory probe's batch (the loop's first: 8 dialogues), its base stored fp32, bf16 and nf4 as
    load_model stores them: the three models held at once and stepped in turn, one thread, CPU seconds, the
    best of --repeat rounds (3 unless given). The whole step the issue's speed goal names, timed as bench
    block times a block, so a loaded machine slows the three alike; large holds about 19 GB at its peak."""
    torch.set_num_threads(1)
    size, cpu, rounds = args.size or "small", torch.device("cpu"), args.repeat or 3
    with tempfile.TemporaryDirectory() as tmp:
        args.model = args.model or standin.build(args.config, os.path.join(tmp, size), size=size)
        tok = load_tokenizer(args.model)
        examples, batches = consumed(lora_settings(args, "", 1), tok)
        batch = [data.Collator(tok.pad_token_id)([examples[i] for i in batches[0]])]
        models = {dtype: _lora_on_base(args.model, dtype) for dtype in BASE_DTYPES}
        autocast = autocast_for("bf16", cpu)
        (n, source), target = batch[0]["input_ids"].shape, batch[0]["labels"].shape[1]
        shape = f"{n}x{source}+{target}"
        runs = {dtype: partial(bare_steps, model, batch, cpu, autocast) for dtype, model in models.items()}
        result = {"size": size, "shapes": {shape: _best_of(rounds, runs)}}
    _print_bases(f"one LoRA step (r=8 q,v) of the whole {size} stand-in, bf16 autocast, CPU s (best of "
                 f"{rounds}), 1 thread; batch x source + target tokens", result["shapes"])
    save("step", result, args)


def _best_of(rounds, runs):
    """{seconds: {base dtype: the best CPU seconds}, nf4_over_bf16, nf4_over_fp32, dequantize_share (nf4's, in
    its best round)} of runs (base dtype -> a function), called in turn in each of `rounds` rounds."""
    best, share = {}, 0.0
    for _ in range(rounds):
        for dtype, run in runs.items():
            start = time.process_time()
            with _dequantizing(time.process_time) as spent:  # CPU time like the whole, not a busy wait
                run()
            seconds = time.process_time() - start
            if seconds < best.get(dtype, float("inf")):
                best[dtype] = seconds
                share = spent[0] / seconds if dtype == "nf4" else share
    return {"seconds": best, "nf4_over_bf16": best["nf4"] / best["bf16"],
            "nf4_over_fp32": best["nf4"] / best["fp32"], "dequantize_share": share}


def _print_bases(title, shapes):
    table(title, [(f"{shape}: {dtype} base", f"{r['seconds'][dtype]:.3f} s"
                   + (f" ({r['nf4_over_bf16']:.2f}x bf16, {r['nf4_over_fp32']:.2f}x fp32; dequantizing "
                      f"{r['dequantize_share']:.0%})" if dtype == "nf4" else ""))
                  for shape, r in shapes.items() for dtype in BASE_DTYPES])


def bench_learn(args):
    steps = 150 if args.quick else 600
    n_test = 100
    with tempfile.TemporaryDirectory() as tmp:
        tiny = standin.build(args.config, os.path.join(tmp, "tiny"), tiny=True)
        s = Settings(model=tiny, data=args.data, output_dir=os.path.join(tmp, "run"), lora_rank=0, lr=3e-3,
                     batch_size=8, max_steps=steps, warmup_ratio=0.05, subsample=5, max_source_len=256,
                     max_target_len=64, eval_every=steps // 5, log_every=steps // 5, seed=0,
                     num_beams=4, max_new_tokens=64)
        validate(s)
        summary = training.train(s)
        with open(os.path.join(s.output_dir, "metrics.jsonl")) as f:
            curve = [(m["step"], m["val_loss"]) for m in map(json.loads, f) if "val_loss" in m]
        test = data.load_splits(args.data, ("test",))["test"][:n_test]
        texts, refs = [d.dialogue for d in test], [d.refs for d in test]
        tok = load_tokenizer(tiny)
        device = compute_device()
        scores = {
            "untrained": metrics.rouge(
                summarize(load_model(tiny).to(device), tok, texts, s, desc="untrained"), refs
            ),
            "lead (first 2 utterances)": metrics.rouge(
                [" ".join(d.dialogue.splitlines()[:2]) for d in test], refs
            ),
            "trained": metrics.rouge(
                summarize(
                    load_model(os.path.join(s.output_dir, "last")).to(device), tok, texts, s, desc="trained"
                ),
                refs,
            ),
        }
    result = {
        "steps": steps,
        "seconds": summary["seconds"],
        "val_loss_curve": curve,
        "test_dialogues": n_test,
        "rouge_per_row": {
            k: {m: round(100 * v, 2) for m, v in sc["per_row"].items()} for k, sc in scores.items()
        },
    }
    table(f"learn: tiny T5 from scratch, {steps} steps of batch 8 ({summary['seconds']:.0f} s)",
           [(f"val loss @ step {st}", f"{v:.3f}") for st, v in curve] +
           [(f"{k}: ROUGE-1/2/L on {n_test} test dialogues",
             " / ".join(f"{100 * sc['per_row'][m]:.2f}" for m in ("rouge1", "rouge2", "rougeL")))
            for k, sc in scores.items()])
    save("learn", result, args)


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m dialsum_raw.bench",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "which", choices=["train", "eval", "memory", "block", "step", "learn", "gpu", "memory-probe"]
    )
    p.add_argument("--quick", action="store_true", help="about a minute instead of about five")
    p.add_argument("--data", default="../shared/dialogsum", help="DialogSum folder or hub id")
    p.add_argument(
        "--config", default="../shared/flan-t5-small", help="flan-t5 config+tokenizer folder for stand-ins"
    )
    p.add_argument("--model", help="model to benchmark (default: a flan-t5-small-shaped stand-in)")
    p.add_argument("--out", default=".", help="folder for bench-*.json")
    p.add_argument("--repeat", type=int, help="eval: run the sweep N times (default 1), keep each cell's "
                   "best; block, step: rounds (default 8, 3)")
    p.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        default="cuda",
        help="cuda where there is one (default); cpu hides the GPUs from this run and its processes",
    )
    p.add_argument("--mode", choices=["lora", "full"], help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    p.add_argument(
        "--size", choices=list(standin.SIZES),
        help="memory --only sharding, block, step: this stand-in size only",
    )
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--sharding", choices=["ddp", "fsdp"], help=argparse.SUPPRESS)
    p.add_argument(
        "--only", choices=["lora", "sharding", "base-dtype"], help="memory: only one of its three parts"
    )
    p.add_argument("--base-dtype", choices=BASE_DTYPES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "cpu":  # before anything starts CUDA; child processes inherit it
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if args.which == "memory-probe":
        return sharded_probe(args) if args.sharding else memory_probe(args)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None and args.which not in ("learn", "block", "step"):
            args.model = standin.build(args.config, os.path.join(tmp, "standin"))
        {"train": bench_train, "eval": bench_eval, "memory": bench_memory, "block": bench_block,
         "step": bench_step, "learn": bench_learn, "gpu": gpucheck.run}[args.which](args)


if __name__ == "__main__":
    run_cli(main)

"""`python -m dialsum_raw.bench train`: our loop against HF's Seq2SeqTrainer + peft, real tokens/s and MFU.
Its own module because the GPU check (gpucheck.py) runs its rows too."""

import json
import os
import tempfile
import time

import torch

from . import data, lora, training
from .measure import bare_steps, consumed, lora_settings, save, table
from .modeling import autocast_for, choose_precision, compute_device, load_model, load_tokenizer


def _matmul_peak(dtype, device):
    """FLOP/s of a square n x n matmul in `dtype`, best of 3 rounds: the ceiling MFU is measured against.
    n is 2048 on a CPU and 8192 on a GPU, where a 2048² product is too small to keep the tensor cores busy
    and would understate the peak (and so overstate MFU)."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / 5)
    return 2 * n ** 3 / best


def _step_flops(model, batch, device):
    """Forward + backward FLOPs of one batch, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode
    batch = {k: v.to(device) for k, v in batch.items()}
    with FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def _padded(batch):
    return batch["input_ids"].numel() + batch["labels"].numel()


def _real(batch):
    return int(batch["attention_mask"].sum() + (batch["labels"] != -100).sum())


class _KeptBatches:
    """HF's collator, keeping each batch it forms: HF's real and padded tokens are then counted, not
    guessed."""

    def __init__(self, collator):
        self.collator, self.batches = collator, []

    def __call__(self, features):
        batch = self.collator(features)
        self.batches.append({k: batch[k] for k in ("input_ids", "attention_mask", "labels")})
        return batch


def _hf_run(args, tok, pool, steps, out, device, **best):
    """Seq2SeqTrainer + peft LoRA r=8 q,v, batch 8, `steps` steps over `pool` with HF's own sampler (the
    notebook's stack; `best` adds the strongest flags HF offers). Returns (its batches, HF's
    train_runtime)."""
    import datasets
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments
    torch.manual_seed(0)
    model = get_peft_model(
        load_model(args.model),
        LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM"
        ),
    )
    hf_args = Seq2SeqTrainingArguments(
        output_dir=out,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        max_steps=steps,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        use_cpu=device.type != "cuda",
        dataloader_pin_memory=device.type == "cuda",
        seed=0,
        disable_tqdm=True,
        **best,
    )
    # One GPU, as ours: on a multi-GPU machine HF would wrap the model in DataParallel over all of them.
    # transformers 5.x has no flag for it; _n_gpu is what Trainer itself sets to 1 for model parallelism.
    hf_args._n_gpu = min(hf_args.n_gpu, 1)
    kept = _KeptBatches(DataCollatorForSeq2Seq(tok, model=model, pad_to_multiple_of=8))
    trainer = Seq2SeqTrainer(model=model, args=hf_args, train_dataset=datasets.Dataset.from_list(pool),
                             data_collator=kept)
    seconds = trainer.train().metrics["train_runtime"]
    return kept.batches[:steps], seconds


def _long_data(dialogues, examples, n, folder):
    """A data folder whose train split is the n dialogues of `examples` with the longest prompts (the
    long-sequence pool; 8 of them also serve as the validation split the loop needs)."""
    longest = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))[:n]
    os.makedirs(folder)
    for name, rows in (("dialogsum.train.jsonl", sorted(longest)), ("dialogsum.dev.jsonl", longest[:8])):
        with open(os.path.join(folder, name), "w") as f:
            f.writelines(json.dumps({"fname": dialogues[i].id, "dialogue": dialogues[i].dialogue,
                                     "summary": dialogues[i].refs[0]}) + "\n" for i in rows)
    return folder



def bench_train(args):
    """One run, each row with its own sampler over the same example pool and count (steps x 8). The default
    pool: HF's notebook settings, HF's best settings, ours in fp32 and at --precision auto, each with torch's
    and our fast dropout. The long pool (the steps x 8 training dialogues with the longest prompts): HF best
    and ours at auto with both dropouts. Real tokens/s, ratios to HF best of the same pool, and MFU against
    a matmul peak measured here.

    HF's group_by_length sizes its sorted groups from the pool (min(len // 32, 50) batches), so HF samples
    the whole pool as in a real epoch; handed only our few batches' examples it would barely group."""
    steps = args.steps or (6 if args.quick else 16)
    device = compute_device()
    auto, why = choose_precision("auto", device)
    tok = load_tokenizer(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        long_data, pools, ours_batches = _pools(args, tok, steps, tmp)
        peak = {"fp32": _matmul_peak(torch.float32, device), "bf16": _matmul_peak(torch.bfloat16, device)}
        model = _warm_model(args.model, ours_batches["default"][:1], device, auto)
        rows = _timed_rows(args, tok, steps, tmp, device, long_data, pools, ours_batches)
        result_rows = _row_figures(rows, model, device, peak)
    result = {"steps": steps, "batch_size": 8, "pool_examples": len(pools["default"]),
              "long_pool_examples": len(pools["long"]), "auto_precision": auto, "auto_reason": why,
              "matmul_peak_gflops": {k: round(v / 1e9, 1) for k, v in peak.items()}, "rows": result_rows,
              **_ratios(result_rows, auto)}
    _print_train(result, peak)
    return save("train", result, args)


def _pools(args, tok, steps, tmp):
    """The default pool (the examples our loop consumes in `steps` steps) and the long pool (the steps x 8
    training dialogues with the longest prompts, written to a data folder of their own). Returns that
    folder, {pool: examples} and {pool: our loop's batches, collated}."""
    s = lora_settings(args, os.path.join(tmp, "ours"), steps)
    pool, batches = consumed(s, tok)
    long_data = _long_data(data.load_splits(args.data, ("train",))["train"][::s.subsample], pool, steps * 8,
                           os.path.join(tmp, "long-data"))
    long_pool, long_batches = consumed(lora_settings(args, "", steps, data=long_data, subsample=1), tok)
    collate = data.Collator(tok.pad_token_id)
    return long_data, {"default": pool, "long": long_pool}, {
        "default": [collate([pool[i] for i in b]) for b in batches],
        "long": [collate([long_pool[i] for i in b]) for b in long_batches]}


def _warm_model(model_dir, batches, device, auto):
    """The LoRA r=8 q,v model the FLOPs are counted on, after a few bare steps in fp32 and at `auto`: the
    first big steps of a fresh process run slow (page faults), and the rows after it are timed."""
    model = load_model(model_dir)
    lora.inject(model, lora.LoRAConfig(("q", "v"), 8, 16, 0.05))
    model.to(device)
    for precision in ("fp32", auto):
        bare_steps(model, batches, device, autocast_for(precision, device))
    return model


def _timed_rows(args, tok, steps, tmp, device, long_data, pools, ours_batches):
    """Every row, timed, in the order it runs: (pool, name, precision, its batches, seconds)."""
    auto = choose_precision("auto", device)[0]

    def hf(name, pool, **best):
        return _hf_run(args, tok, pools[pool], steps, os.path.join(tmp, name), device, **best)

    def ours(name, pool, **over):
        run = lora_settings(args, os.path.join(tmp, name), steps, **over)
        return ours_batches[pool], training.train(run)["seconds"]

    best = dict(bf16=auto == "bf16", train_sampling_strategy="group_by_length")
    rows = [
        ("default", "HF notebook: random batches, pad to 8, fp32", "fp32", *hf("hf-notebook", "default")),
        ("default", f"HF best: group_by_length, pad to 8, {auto}", auto, *hf("hf-best", "default", **best)),
    ]
    for precision in ("fp32", "auto"):
        name = precision + (f" = {auto}" if precision == "auto" else "")
        rows += [("default", f"ours {name}, {impl} dropout", choose_precision(precision, device)[0],
                  *ours(f"ours-{precision}-{impl}", "default", precision=precision, dropout_impl=impl))
                 for impl in ("torch", "fast")]
    # the base stored in bf16 and nf4 (--base-dtype), beside the fp32 base's row above; a bf16 base computes
    # in bf16
    rows += [
        (
            "default",
            f"ours {'bf16' if dtype == 'bf16' else auto}, base {dtype}, fast dropout",
            "bf16" if dtype == "bf16" else auto,
            *ours(
                f"ours-base-{dtype}",
                "default",
                precision="bf16" if dtype == "bf16" else "auto",
                base_dtype=dtype,
            ),
        )
        for dtype in ("bf16", "nf4")
    ]
    rows += [
        ("long", f"long: HF best: group_by_length, pad to 8, {auto}", auto, *hf("hf-long", "long", **best))
    ]
    rows += [("long", f"long: ours auto = {auto}, {impl} dropout", auto,
              *ours(f"ours-long-{impl}", "long", data=long_data, subsample=1, dropout_impl=impl))
             for impl in ("torch", "fast")]
    return rows


def _row_figures(rows, model, device, peak):
    """Each row's real tokens/s, share of real tokens, FLOPs per step and MFU against its precision's peak."""
    result_rows, flops_of = [], {}
    for pool_name, name, precision, row_batches, seconds in rows:
        median = sorted(row_batches, key=_padded)[len(row_batches) // 2]
        real, padded = sum(map(_real, row_batches)), sum(map(_padded, row_batches))
        if id(median) not in flops_of:  # the ours rows of a pool share their batches: counted once
            flops_of[id(median)] = _step_flops(model, median, device)
        # FLOPs per step: the median batch counted, scaled to the row's mean padded tokens per step
        flops = flops_of[id(median)] * padded / _padded(median) / len(row_batches)
        result_rows.append(
            {
                "pool": pool_name,
                "row": name,
                "precision": precision,
                "steps": len(row_batches),
                "seconds": round(seconds, 2),
                "real_tokens": real,
                "real_tokens_per_s": round(real / seconds, 1),
                "real_token_fraction": round(real / padded, 4),
                "gflops_per_step": round(flops / 1e9, 1),
                "mfu": round(flops / (seconds / len(row_batches)) / peak[precision], 4),
            }
        )
    return result_rows


def _ratios(result_rows, auto):
    """Each row's speed over HF best of its pool (added to the row), and the headline ratios."""
    speed = {r["row"]: r["real_tokens_per_s"] for r in result_rows}
    hf_best = {r["pool"]: r["real_tokens_per_s"] for r in result_rows if "HF best" in r["row"]}
    for r in result_rows:
        r["vs_hf_best"] = round(r["real_tokens_per_s"] / hf_best[r["pool"]], 3)
    fast_auto, fast_long = f"ours auto = {auto}, fast dropout", f"long: ours auto = {auto}, fast dropout"
    bf16_base, nf4_base = (
        speed["ours bf16, base bf16, fast dropout"],
        speed[f"ours {auto}, base nf4, fast dropout"],
    )
    return {
        "ours_auto_over_ours_fp32": round(speed[fast_auto] / speed["ours fp32, fast dropout"], 3),
        "base_bf16_over_base_fp32": round(bf16_base / speed[fast_auto], 3),
        "base_nf4_step_over_base_bf16_step": round(bf16_base / nf4_base, 3),
        "ours_over_hf_best_same_precision": round(speed[fast_auto] / hf_best["default"], 3),
        "ours_over_hf_best_same_precision_long": round(speed[fast_long] / hf_best["long"], 3),
        "fast_over_torch_dropout": {
            "fp32": round(speed["ours fp32, fast dropout"] / speed["ours fp32, torch dropout"], 3),
            auto: round(speed[fast_auto] / speed[f"ours auto = {auto}, torch dropout"], 3),
            f"{auto} long": round(speed[fast_long] / speed[f"long: ours auto = {auto}, torch dropout"], 3),
        },
    }


def _print_train(result, peak):
    auto, rows = result["auto_precision"], result["rows"]
    table(
        f"train: LoRA r=8 q,v, batch 8, {result['steps']} steps each from the same "
        f"{result['pool_examples']:,} "
        f"examples (long: the {result['long_pool_examples']} with the longest prompts); matmul peak fp32 "
        f"{peak['fp32'] / 1e9:,.0f} / bf16 {peak['bf16'] / 1e9:,.0f} GFLOP/s; auto = {auto} "
        f"({result['auto_reason']})",
        [
            (
                r["row"],
                f"{r['real_tokens_per_s']:>8,.0f} real tok/s  {r['vs_hf_best']:.2f}x HF best  "
                f"MFU {r['mfu']:5.1%} of {r['precision']} peak  ({r['real_token_fraction']:.0%} real tokens)",
            )
            for r in rows
        ]
        + [
            ("ours auto / ours fp32 (fast dropout)", f"{result['ours_auto_over_ours_fp32']:.2f}x"),
            ("base bf16 / base fp32, speed (fast dropout)", f"{result['base_bf16_over_base_fp32']:.2f}x"),
            ("base nf4 step / base bf16 step", f"{result['base_nf4_step_over_base_bf16_step']:.2f}x"),
            (
                f"ours (fast dropout) / HF best, both {auto}",
                f"{result['ours_over_hf_best_same_precision']:.2f}x; "
                f"long pool {result['ours_over_hf_best_same_precision_long']:.2f}x",
            ),
            (
                "fast dropout / torch dropout",
                ", ".join(f"{k} {v:.2f}x" for k, v in result["fast_over_torch_dropout"].items()),
            ),
        ],
    )

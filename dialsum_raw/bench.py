"""Benchmarks: figures measured side by side in one run, printed as tables and saved as bench-*.json.

    python -m dialsum_raw.bench train   [--quick]   # our loop vs HF Seq2SeqTrainer + peft
    python -m dialsum_raw.bench eval    [--quick]   # batched evaluator vs the notebook's per-row generate
    python -m dialsum_raw.bench memory  [--quick]   # peak RSS LoRA vs full; adapter vs checkpoint size
    python -m dialsum_raw.bench learn   [--quick]   # tiny T5 from scratch: loss curve, ROUGE vs baselines

Models are random-weight stand-ins built from --config (flan-t5-small's exact shape; --tiny for
learn), data is the real DialogSum corpus from --data. On CUDA the same code runs with bf16 autocast.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

from . import data, lora, metrics, standin, training
from .config import Settings, validate
from .errors import run_cli
from .generation import generation_kwargs, summarize
from .modeling import autocast_for, load_model, load_tokenizer


def _table(title, rows):
    width = max(len(r[0]) for r in rows)
    print(f"\n{title}")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def _save(name, result, args):
    result = {"device": "cuda" if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()} threads",
              "torch": torch.__version__, "quick": args.quick, **result}
    path = os.path.join(args.out, f"bench-{name}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {path}")


def _real_tokens(examples):
    return sum(len(e["input_ids"]) + len(e["labels"]) for e in examples)


def _lora_settings(args, out, steps, **over):
    s = Settings(model=args.model, data=args.data, output_dir=out, lora_rank=8, lora_alpha=16, lora_dropout=0.05,
                 lr=1e-3, batch_size=8, max_steps=steps, subsample=10, eval_every=steps, log_every=steps,
                 seed=0, **over)
    validate(s)
    return s


def _consumed(settings, tokenizer):
    """The examples and batches our loop consumes in settings.max_steps steps, in order."""
    examples = training.load_examples(settings, tokenizer, lambda *a: None)["train"]
    sampler = data.LengthGroupedBatchSampler([len(e["input_ids"]) for e in examples], settings.batch_size,
                                             seed=settings.seed)
    batches = list(sampler)[:settings.max_steps * settings.grad_accum]
    return examples, batches


def _bare_steps(model, batches, device, autocast):
    """Forward + backward + AdamW step and nothing else: the floor under any loop."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    start = time.perf_counter()
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_train(args):
    steps = 6 if args.quick else 16
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = load_tokenizer(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        s = _lora_settings(args, os.path.join(tmp, "ours"), steps)
        examples, batches = _consumed(s, tok)
        used = [examples[i] for b in batches for i in b]
        collate = data.Collator(tok.pad_token_id)
        device_batches = [collate([examples[i] for i in b]) for b in batches]
        def bare_run():
            model = load_model(args.model)
            lora.inject(model, ("q", "v"), 8, 16, 0.05)
            return _bare_steps(model.to(device), device_batches, device, autocast_for("auto", device))

        # The bare loop runs first and last: a fresh process runs its first big steps slower (page
        # faults, allocator growth), so order matters on CPU; the two bare runs show how much.
        bare_before = bare_run()
        ours = training.train(s)

        # the notebook's stack on the very same examples: random batches padded to a multiple of 8
        import datasets
        from peft import LoraConfig, get_peft_model
        from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments
        torch.manual_seed(0)
        model = get_peft_model(load_model(args.model), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                                  target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM"))
        hf_args = Seq2SeqTrainingArguments(output_dir=os.path.join(tmp, "hf"), per_device_train_batch_size=8,
                                           learning_rate=1e-3, num_train_epochs=1, logging_steps=10 ** 6,
                                           save_strategy="no", report_to=[], bf16=device.type == "cuda",
                                           use_cpu=device.type != "cuda", dataloader_pin_memory=False, seed=0,
                                           disable_tqdm=True)
        collator = DataCollatorForSeq2Seq(tok, model=model, pad_to_multiple_of=8)
        trainer = Seq2SeqTrainer(model=model, args=hf_args, train_dataset=datasets.Dataset.from_list(used),
                                 data_collator=collator)
        hf_seconds = trainer.train().metrics["train_runtime"]
        shuffled = [used[i] for i in torch.randperm(len(used), generator=torch.Generator().manual_seed(0))]
        hf_batches = [collator(shuffled[i:i + 8]) for i in range(0, len(shuffled), 8)]  # as HF's random sampler
        hf_padded = sum(b["input_ids"].numel() + b["labels"].numel() for b in hf_batches)

        bare_after = bare_run()
        bare = (bare_before + bare_after) / 2

    real = _real_tokens(used)
    result = {"steps": steps, "batch_size": 8, "examples": len(used), "real_tokens": real,
              "ours_seconds": ours["seconds"], "hf_seconds": round(hf_seconds, 2),
              "bare_seconds_before_after": [round(bare_before, 2), round(bare_after, 2)],
              "ours_real_tokens_per_s": round(real / ours["seconds"], 1),
              "hf_real_tokens_per_s": round(real / hf_seconds, 1),
              "speedup_vs_hf": round(hf_seconds / ours["seconds"], 3),
              "ours_overhead_vs_bare": round(ours["seconds"] / bare - 1, 4),
              "ours_real_token_fraction": round(1 - ours["padding_fraction"], 4),
              "hf_real_token_fraction": round(real / hf_padded, 4)}
    _table(f"train: LoRA r=8 q,v, batch 8, {steps} steps, {len(used)} identical examples ({real:,} real tokens)", [
        ("ours (length-grouped, dynamic padding)", f"{result['ours_real_tokens_per_s']:>9,.0f} real tok/s"),
        ("HF Seq2SeqTrainer + peft (pad to 8)", f"{result['hf_real_tokens_per_s']:>9,.0f} real tok/s"),
        ("speed ratio ours / HF", f"{result['speedup_vs_hf']:.2f}x"),
        ("real-token fraction ours / HF", f"{result['ours_real_token_fraction']:.1%} / "
                                          f"{result['hf_real_token_fraction']:.1%}"),
        ("bare f/b/step, run first / last", f"{bare_before:.1f} s / {bare_after:.1f} s"),
        ("our loop overhead over bare (mean)", f"{result['ours_overhead_vs_bare']:+.1%}")])
    _save("train", result, args)


def _per_row_generate(model, tok, texts, settings):
    """The notebook: one generate call per row, no batching, no de-duplication."""
    out = []
    with torch.no_grad():
        for text in texts:
            enc = tok(data.prompt(text), return_tensors="pt", max_length=settings.max_source_len, truncation=True)
            ids = model.generate(**enc, **generation_kwargs(settings))
            out.append(tok.decode(ids[0], skip_special_tokens=True).strip())
    return out


def bench_eval(args):
    n = 8 if args.quick else 16
    s = Settings(num_beams=4, max_new_tokens=32 if args.quick else 64)  # default --batch-size
    model, tok = load_model(args.model).eval(), load_tokenizer(args.model)
    rows = list(data.flatten(data.load_splits(args.data, ("test",))["test"][:n]))
    row_texts = [d.dialogue for _, d, _ in rows]
    unique = list(dict.fromkeys(row_texts))

    t = time.perf_counter(); notebook = _per_row_generate(model, tok, row_texts, s); t_notebook = time.perf_counter() - t
    t = time.perf_counter(); ours = summarize(model, tok, row_texts, s); t_ours = time.perf_counter() - t
    assert ours == notebook, "batched outputs differ from per-row generate"
    t = time.perf_counter(); single = _per_row_generate(model, tok, unique, s); t_single = time.perf_counter() - t
    t = time.perf_counter(); batched = summarize(model, tok, unique, s); t_batched = time.perf_counter() - t
    assert batched == single
    result = {"rows": len(rows), "dialogues": len(unique), "generation": generation_kwargs(s),
              "notebook_per_row_seconds": round(t_notebook, 2), "ours_seconds": round(t_ours, 2),
              "speedup_vs_notebook": round(t_notebook / t_ours, 2), "outputs_identical": True,
              "unique_per_example_seconds": round(t_single, 2), "unique_batched_seconds": round(t_batched, 2),
              "batching_gain": round(t_single / t_batched, 2)}
    _table(f"eval: {len(rows)} hub-layout test rows ({len(unique)} dialogues x 3 references), beams 4, "
           f"max_new_tokens {s.max_new_tokens}; outputs identical", [
               ("notebook: generate per row", f"{t_notebook:7.1f} s"),
               ("ours: unique dialogues, sorted batches", f"{t_ours:7.1f} s"),
               ("speed ratio", f"{result['speedup_vs_notebook']:.1f}x"),
               (f"pure batching gain on {len(unique)} unique dialogues", f"{result['batching_gain']:.1f}x")])
    _save("eval", result, args)


def bench_memory(args):
    steps = 3 if args.quick else 6
    runs = {}
    for mode in ("lora", "full"):
        cmd = [sys.executable, "-m", "dialsum_raw.bench", "memory-probe", "--model", args.model, "--data", args.data,
               "--mode", mode, "--steps", str(steps)]
        runs[mode] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(args.model)
        model.save_pretrained(os.path.join(tmp, "full"))
        lora.inject(model, ("q", "v"), 8, 16)
        lora.save_adapter(model, os.path.join(tmp, "adapter"), args.model)
        size = {name: sum(os.path.getsize(os.path.join(tmp, name, f)) for f in os.listdir(os.path.join(tmp, name)))
                for name in ("full", "adapter")}
    result = {"steps": steps, "batch_size": 8, "peak_rss_mb": {m: r["peak_rss_mb"] for m, r in runs.items()},
              "peak_cuda_mb": {m: r["peak_cuda_mb"] for m, r in runs.items()},
              "loaded_rss_mb": {m: r["loaded_rss_mb"] for m, r in runs.items()},
              "training_rss_mb": {m: round(r["peak_rss_mb"] - r["loaded_rss_mb"], 1) for m, r in runs.items()},
              "checkpoint_bytes": size["full"], "adapter_bytes": size["adapter"],
              "checkpoint_over_adapter": round(size["full"] / size["adapter"], 1)}
    tr, cuda = result["training_rss_mb"], result["peak_cuda_mb"]
    _table(f"memory: {steps} training steps, batch 8, flan-t5-small shape", [
        ("peak RSS LoRA / full", f"{runs['lora']['peak_rss_mb']:.0f} MB / {runs['full']['peak_rss_mb']:.0f} MB"),
        *([("peak CUDA memory LoRA / full", f"{cuda['lora']:.0f} MB / {cuda['full']:.0f} MB")] if cuda["lora"] else []),
        ("growth over the loaded model LoRA / full", f"{tr['lora']:.0f} MB / {tr['full']:.0f} MB"),
        ("adapter / full checkpoint", f"{size['adapter'] / 1e6:.2f} MB / {size['full'] / 1e6:.1f} MB "
                                      f"({result['checkpoint_over_adapter']:.0f}x smaller)")])
    _save("memory", result, args)


def memory_probe(args):
    """Runs in its own process so each mode's peak RSS is its own."""
    def rss_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tok = load_tokenizer(args.model)
    s = _lora_settings(args, "", args.steps)
    examples, batches = _consumed(s, tok)
    model = load_model(args.model)
    if args.mode == "lora":
        lora.inject(model, ("q", "v"), 8, 16, 0.05)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    loaded = rss_mb()
    collate = data.Collator(tok.pad_token_id)
    _bare_steps(model, [collate([examples[i] for i in b]) for b in batches], device, autocast_for("auto", device))
    peak_gpu = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else None
    print(json.dumps({"mode": args.mode, "loaded_rss_mb": round(loaded, 1), "peak_rss_mb": round(rss_mb(), 1),
                      "peak_cuda_mb": peak_gpu}))


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
        scores = {
            "untrained": metrics.rouge(summarize(load_model(tiny), tok, texts, s, desc="untrained"), refs),
            "lead (first 2 utterances)": metrics.rouge([" ".join(d.dialogue.splitlines()[:2]) for d in test], refs),
            "trained": metrics.rouge(summarize(load_model(os.path.join(s.output_dir, "last")), tok, texts, s,
                                               desc="trained"), refs),
        }
    result = {"steps": steps, "seconds": summary["seconds"], "val_loss_curve": curve, "test_dialogues": n_test,
              "rouge_per_row": {k: {m: round(100 * v, 2) for m, v in sc["per_row"].items()} for k, sc in scores.items()}}
    _table(f"learn: tiny T5 from scratch, {steps} steps of batch 8 ({summary['seconds']:.0f} s)",
           [(f"val loss @ step {st}", f"{v:.3f}") for st, v in curve] +
           [(f"{k}: ROUGE-1/2/L on {n_test} test dialogues",
             " / ".join(f"{100 * sc['per_row'][m]:.2f}" for m in ("rouge1", "rouge2", "rougeL")))
            for k, sc in scores.items()])
    _save("learn", result, args)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m dialsum_raw.bench", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", choices=["train", "eval", "memory", "learn", "memory-probe"])
    p.add_argument("--quick", action="store_true", help="about a minute instead of about five")
    p.add_argument("--data", default="../shared/dialogsum", help="DialogSum folder or hub id")
    p.add_argument("--config", default="../shared/flan-t5-small", help="flan-t5 config+tokenizer folder for stand-ins")
    p.add_argument("--model", help="model to benchmark (default: a flan-t5-small-shaped stand-in)")
    p.add_argument("--out", default=".", help="folder for bench-*.json")
    p.add_argument("--mode", choices=["lora", "full"], help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.which == "memory-probe":
        return memory_probe(args)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None and args.which != "learn":
            args.model = standin.build(args.config, os.path.join(tmp, "standin"))
        {"train": bench_train, "eval": bench_eval, "memory": bench_memory, "learn": bench_learn}[args.which](args)


if __name__ == "__main__":
    run_cli(main)

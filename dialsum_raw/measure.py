"""What every benchmark shares (bench.py, trainbench.py, gpucheck.py): the machine a figure belongs to, the
printed table, the saved bench-*.json, the LoRA run the training rows start from, the batches our loop
consumes, the bare training step, and a timed generation."""

import json
import os
import platform
import time

import torch

from . import data, training
from .config import Settings, validate
from .generation import generate_ids
from .modeling import cpu_bf16_units


def table(title, rows):
    """Print `title`, then (name, value) rows with the names aligned."""
    width = max(len(r[0]) for r in rows)
    print(f"\n{title}")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def _cpu():
    """This CPU's model name, bf16 units and our thread count: a speed ratio belongs to one machine."""
    name = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"cpu: {name}, {cpu_bf16_units() or 'no bf16 units'}, {torch.get_num_threads()} threads"


def machine():
    """The GPU's name where there is one, else _cpu()."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else _cpu()


def save(name, result, args):
    """Write args.out/bench-{name}.json: the result with the machine, torch's version and --quick."""
    result = {"device": machine(), "torch": torch.__version__, "quick": args.quick, **result}
    path = os.path.join(args.out, f"bench-{name}.json")
    os.makedirs(args.out, exist_ok=True)  # --out may name a new folder
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {path}")
    return result


def lora_settings(args, out, steps, **over):
    """The benchmarks' LoRA run: r=8 on q, v, batch 8, lr 1e-3, every 10th dialogue, `steps` steps."""
    s = Settings(
        **{
            **dict(
                model=args.model,
                data=args.data,
                output_dir=out,
                lora_rank=8,
                lora_alpha=16,
                lora_dropout=0.05,
                lr=1e-3,
                batch_size=8,
                max_steps=steps,
                subsample=10,
                eval_every=steps,
                log_every=steps,
                seed=0,
            ),
            **over,
        }
    )
    validate(s)
    return s


def consumed(settings, tokenizer):
    """The examples and batches our loop consumes in settings.max_steps steps, in order."""
    examples = training.load_examples(settings, tokenizer, lambda *a: None)["train"]
    sampler = data.LengthGroupedBatchSampler([len(e["input_ids"]) for e in examples], settings.batch_size,
                                             seed=settings.seed)
    batches = list(sampler)[:settings.max_steps * settings.grad_accum]
    return examples, batches


def bare_steps(model, batches, device, autocast):
    """Forward + backward + AdamW step and nothing else: the floor under any loop."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    if (
        device.type == "cuda"
    ):  # the clock starts once earlier queued GPU work is done, not while it still runs
        torch.cuda.synchronize(device)
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


def timed_ids(model, tok, texts, settings):
    """(seconds, token ids) of one generate_ids call."""
    start = time.perf_counter()
    kind = "int8" if settings.quantize == "int8" else settings.precision
    ids = generate_ids(
        model, tok, texts, settings, desc=f"{settings.engine} {kind} batch {settings.eval_batch_size}"
    )
    return time.perf_counter() - start, ids

"""The training loop: forward, token-normalized loss, backward, clip, step, schedule. One function.

Loss normalization: every optimizer step divides the summed token losses of its whole
accumulation window, over all processes, by the number of target tokens in that window. One
process with batch B and N processes with batch B/N then take exactly the same step, and a
short summary weighs no more than a long one (a mean of per-batch means would).
"""

import json
import math
import os
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import checkpoint, data, lora
from .config import Settings
from .errors import UserError
from .modeling import autocast_for, count_parameters, load_model, load_tokenizer, parameter_report

SETTINGS_FILE = "settings.toml"
METRICS_FILE = "metrics.jsonl"


# ---------------------------------------------------------------- set-up helpers

def setup_distributed():
    """(rank, world, device). torchrun sets WORLD_SIZE; gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if world > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    return (dist.get_rank() if world > 1 else 0), world, device


def all_sum(values, device, world):
    """Sum a list of floats over all processes (one collective)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(t)
    return t.tolist()


def make_optimizer(model, settings: Settings):
    """AdamW over trainable tensors; no weight decay on norms and biases (1-D tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": settings.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=settings.lr)


def lr_factor(step, total, warmup, schedule):
    """Linear warmup to 1, then linear (or cosine) decay to 0, as HF's schedules."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 1 - progress) if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def token_loss_sum(model, batch, autocast):
    """Summed cross-entropy over real target tokens (labels != -100), computed in fp32."""
    labels = batch["labels"]
    decoder_input_ids = model_core(model).prepare_decoder_input_ids_from_labels(labels=labels)
    with autocast():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=decoder_input_ids).logits
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")


def model_core(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


@torch.no_grad()
def validation_loss(model, examples, collate, settings, device, rank, world, autocast):
    """Token-weighted mean loss over the validation examples, sharded across ranks."""
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    size = settings.batch_size * 2
    chunks = [order[i:i + size] for i in range(0, len(order), size)][rank::world]
    total, tokens = 0.0, 0
    for chunk in chunks:
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in chunk]).items()}
        total += token_loss_sum(model, batch, autocast).item()
        tokens += int((batch["labels"] != -100).sum())
    model.train()
    total, tokens = all_sum([total, tokens], device, world)
    return total / max(tokens, 1)


def save_settings(settings: Settings, path):
    """settings.toml: the exact run, readable back by --config or --resume (JSON scalars are TOML)."""
    skip = {"resume", "overwrite"}
    lines = [f"{k} = {json.dumps(list(v) if isinstance(v, tuple) else v)}"
             for k, v in vars(settings).items() if v is not None and k not in skip]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def load_examples(settings: Settings, tokenizer, log):
    """Tokenized train and validation examples, every `subsample`-th dialogue kept."""
    splits = data.load_splits(settings.data, ("train", "validation"))
    out = {}
    for name, dialogues in splits.items():
        out[name], cut = data.encode(dialogues[::settings.subsample], tokenizer,
                                     settings.max_source_len, settings.max_target_len)
        log(f"{name}: {len(out[name]):,} examples; cut to the limits ({settings.max_source_len}/"
            f"{settings.max_target_len} tokens): {cut['truncated_sources']} sources, {cut['truncated_targets']} targets")
    return out


# ---------------------------------------------------------------- the run

def train(settings: Settings) -> dict:
    rank, world, device = setup_distributed()
    out = settings.output_dir
    if not settings.resume:
        checkpoint.prepare_output_dir(out, settings.overwrite, SETTINGS_FILE, remove=rank == 0, resumable=True)
    if world > 1:
        dist.barrier()  # every rank has checked the output dir before rank 0 writes into it
    resume_from = None
    if settings.resume:
        resume_from = checkpoint.find(os.path.join(settings.resume, "last"))
        if resume_from is None:
            raise UserError(f"--resume {settings.resume}: no checkpoint there (expected "
                            f"{os.path.join(settings.resume, 'last', checkpoint.TRAINER_STATE)})")
        state = checkpoint.load_state(resume_from)
        if state["is_adapter"] != settings.is_lora:
            raise UserError(f"--resume {settings.resume}: it holds a {'LoRA' if state['is_adapter'] else 'full'} "
                            f"run but --lora-rank is {settings.lora_rank}")
    autocast = autocast_for(settings.precision, device)
    log = print if rank == 0 else (lambda *a, **k: None)

    # data
    tokenizer = load_tokenizer(settings.model)
    examples = load_examples(settings, tokenizer, log)
    train_set, val_set = examples["train"], examples["validation"]
    sampler = data.LengthGroupedBatchSampler([len(e["input_ids"]) for e in train_set], settings.batch_size,
                                             world, rank, settings.seed)
    collate = data.Collator(tokenizer.pad_token_id)
    # Its own generator: iter(DataLoader) draws a seed, which must not shift the dropout RNG on resume.
    loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=collate, pin_memory=device.type == "cuda",
                        generator=torch.Generator())

    # model (+ LoRA)
    torch.manual_seed(settings.seed)
    if settings.is_lora:
        model = load_model(settings.model, settings.dropout)
        if resume_from:
            lora.load_adapter(model, resume_from)
        else:
            lora.inject(model, settings.lora_targets, settings.lora_rank, settings.lora_alpha,
                        settings.lora_dropout, settings.rslora)
    else:
        model = load_model(resume_from or settings.model, settings.dropout)
    model.to(device).train()
    log(parameter_report(model))
    raw = model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    # optimizer and schedule
    steps_per_epoch = len(sampler) // settings.grad_accum
    if steps_per_epoch == 0:
        raise UserError(f"one epoch has {len(sampler)} batches, fewer than --grad-accum {settings.grad_accum}")
    total = settings.max_steps or math.ceil(settings.epochs * steps_per_epoch)
    warmup = math.ceil(settings.warmup_ratio * total)
    optimizer = make_optimizer(raw, settings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, settings.schedule))

    # everything a resumed run needs to continue its counters (window_*: loss since the last log line)
    progress = {"step": 0, "tokens": 0, "padded_tokens": 0, "seconds": 0.0, "best_val_loss": float("inf"),
                "window_loss": 0.0, "window_tokens": 0}
    metrics_path = os.path.join(out, METRICS_FILE)
    if resume_from:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        progress.update({k: state[k] for k in progress})
        checkpoint.set_rng_state(state["rng"])
        if rank == 0 and os.path.isfile(metrics_path):  # drop lines logged after the checkpoint
            with open(metrics_path) as f:
                kept = [line for line in f if json.loads(line)["step"] <= progress["step"]]
            with open(metrics_path, "w") as f:
                f.writelines(kept)
        log(f"resumed from {resume_from} at step {progress['step']}")
    else:
        torch.manual_seed(settings.seed + rank)  # dropout masks differ per rank
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        save_settings(settings, os.path.join(out, SETTINGS_FILE))

    def write_metrics(line):
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(line) + "\n")

    bar = tqdm(total=total, initial=progress["step"], disable=rank != 0, desc="train", unit="step")
    started = time.time() - progress["seconds"]
    batches = None
    for step in range(progress["step"], total):
        epoch, within = divmod(step, steps_per_epoch)
        if batches is None or within == 0:
            sampler.set_epoch(epoch, within * settings.grad_accum)
            batches = iter(loader)

        # one optimizer step over an accumulation window of micro-batches
        window = [{k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
                  for _ in range(settings.grad_accum)]
        tgt = sum(int((b["labels"] != -100).sum()) for b in window)
        src = sum(int(b["attention_mask"].sum()) for b in window)
        padded = sum(b["input_ids"].numel() + b["labels"].numel() for b in window)
        global_tgt, global_src, global_padded = all_sum([tgt, src, padded], device, world)
        loss_sum = 0.0
        for i, batch in enumerate(window):
            sync = i == len(window) - 1 or world == 1
            with (nullcontext() if sync else model.no_sync()):
                loss = token_loss_sum(model, batch, autocast)
                (loss * world / global_tgt).backward()  # DDP averages over ranks; * world undoes that
            loss_sum += loss.item()
        step_loss = all_sum([loss_sum], device, world)[0] / global_tgt
        if not math.isfinite(step_loss):
            bar.close()
            raise UserError(f"loss is {step_loss} at step {step + 1}: training diverged (learning rate too high?); "
                            f"nothing was saved after it, the last good checkpoint is {os.path.join(out, 'last')}")
        if settings.clip > 0:
            torch.nn.utils.clip_grad_norm_(raw.parameters(), settings.clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        progress["step"] = step + 1
        progress["tokens"] += int(global_tgt + global_src)
        progress["padded_tokens"] += int(global_padded)
        progress["seconds"] = time.time() - started
        progress["window_loss"] += step_loss * global_tgt
        progress["window_tokens"] += global_tgt
        lr = scheduler.get_last_lr()[0]
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{progress['tokens'] / progress['seconds']:.0f}")
        line = {"step": step + 1, "loss": round(progress["window_loss"] / progress["window_tokens"], 6), "lr": lr,
                "tokens": progress["tokens"], "seconds": round(progress["seconds"], 3)}
        if (step + 1) % settings.log_every == 0:
            write_metrics(line)
            progress["window_loss"], progress["window_tokens"] = 0.0, 0

        at_eval = (step + 1) % settings.eval_every == 0 if settings.eval_every else within == steps_per_epoch - 1
        if at_eval or step + 1 == total:
            val = validation_loss(raw, val_set, collate, settings, device, rank, world, autocast)
            write_metrics({**line, "loss": step_loss, "val_loss": round(val, 6)})
            best = val < progress["best_val_loss"]
            progress["best_val_loss"] = min(val, progress["best_val_loss"])
            bar.set_postfix(loss=f"{step_loss:.4f}", val=f"{val:.4f}", lr=f"{lr:.2e}")
            if rank == 0:
                last = os.path.join(out, "last")
                checkpoint.save(last, raw, tokenizer, settings.model, optimizer, scheduler, progress)
                if best:
                    checkpoint.copy(last, os.path.join(out, "best"))
            if world > 1:
                dist.barrier()
    bar.close()

    trainable, all_params = count_parameters(raw)
    summary = {"trainable_parameters": trainable, "all_parameters": all_params, "steps": progress["step"],
               "seconds": round(progress["seconds"], 1), "best_val_loss": progress["best_val_loss"],
               "tokens": progress["tokens"], "tokens_per_second": round(progress["tokens"] / max(progress["seconds"], 1e-9), 1),
               "padding_fraction": round(1 - progress["tokens"] / max(progress["padded_tokens"], 1), 4),
               "processes": world, "global_batch": settings.batch_size * world * settings.grad_accum}
    if rank == 0:
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        log(json.dumps(summary, indent=2))
    if world > 1:
        dist.destroy_process_group()
    return summary

"""The training loop: forward, token-normalized loss, backward, clip, step, schedule.

`train` reads top to bottom: set up, restore a resumed run, then a loop of (step, maybe validate,
maybe save), each a named function below it over one `Run` object.

Loss normalization: every optimizer step divides the summed token losses of its whole
accumulation window, over all processes, by the number of target tokens in that window. One
process with batch B and N processes with batch B/N then take exactly the same step, and a
short summary weighs no more than a long one (a mean of per-batch means would).
"""

import datetime
import json
import math
import os
import signal
import sys
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import checkpoint, data, lora, metrics, sharding
from .config import SETTINGS_FILE, Settings, normalize, read_run_settings, resume_may_change
from .errors import Stopped, UserError
from .generation import check_length, summarize
from .heartbeat import Heartbeat
from .modeling import (autocast_for, check_base_precision, choose_precision, count_parameters, load_model,
                       load_tokenizer, mmap_large_buffers, parameter_report, set_dropout_impl)
from .runlog import METRICS_FILE, read_metrics


# ---------------------------------------------------------------- set-up helpers

# How long a rank waits in a collective for the others: rank 0's fsynced save of a large model included.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=1)


def setup_distributed():
    """(rank, world, device). torchrun sets WORLD_SIZE; gloo on CPU, nccl on CUDA with one GPU per process,
    the current device set even for one process (caches, streams and the RNG state follow it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        processes, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count()
        if processes > gpus:  # every rank refuses alike, before any waits for the others
            raise UserError(
                f"{processes} processes on this machine but it has {gpus} GPU{'s' * (gpus != 1)}: "
                f"run one process per GPU (torchrun --nproc_per_node {gpus})"
            )
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        gpu = {"device_id": device} if cuda else {}  # binds nccl to this rank's GPU (torch >= 2.2)
        # torchrun --max-restarts keeps its key-value store across restarts: keyed by the restart, a restarted
        # group never reads the dead workers' addresses (gloo: "connectFullMesh failed ... Connection
        # refused")
        store, rank, size = next(dist.rendezvous("env://", timeout=COLLECTIVE_TIMEOUT))
        store = dist.PrefixStore(
            f"dialsum/restart{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store
        )
        dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=size,
                                timeout=COLLECTIVE_TIMEOUT, **gpu)
    return (dist.get_rank() if world > 1 else 0), world, device


def all_sum(values, device, world):
    """Sum a list of numbers over all processes (one collective, read back with one wait on the device).
    One process has nothing to sum: its numbers come back as they are."""
    if world == 1:
        return [float(v) for v in values]
    t = on_device(values, device)
    dist.all_reduce(t)
    return t.tolist()


def on_device(values, device):
    """Host numbers as a float64 tensor on `device`. The copy does not wait for the work queued there."""
    return torch.tensor(values, dtype=torch.float64).to(device, non_blocking=True)


def make_optimizer(model, settings: Settings):
    """AdamW over trainable tensors. An adapter layer declares the roles of its own tensors
    (AdapterLinear.optimizer_roles: FAST, NO_DECAY); any other tensor (a full fine-tune's) takes no weight
    decay when it is 1-D (norms, biases). LoRA+ (ratio K != 1): the FAST tensors (B, DoRA's magnitude) and the
    other 1-D tensors learn at K x lr, grouped as peft's create_loraplus_optimizer does (which, unlike these
    roles, would decay DoRA's magnitude)."""
    k = settings.lora_plus_ratio
    layers = [m for _, m in lora.lora_layers(model)]
    roles = {p: role for m in layers for p, role in m.optimizer_roles().items() if p.requires_grad}
    if k != 1 and not any(fast for fast, _ in roles.values()):
        which = (f"--lora-variant {layers[0].cfg.variant} with --lora-init {layers[0].cfg.init} trains none"
                 if layers else "this model has none (--lora-rank 0)")
        raise UserError(
            f"--lora-plus-ratio {k:g} needs LoRA layers with a trainable B (a tensor LoRA+ speeds up); "
            f"{which}"
        )
    groups = {}  # (fast, decay) -> tensors; ordered so that K = 1 keeps the plain two groups
    for p in model.parameters():
        if p.requires_grad:
            fast, decay = roles.get(p, (p.ndim < 2, p.ndim >= 2))
            groups.setdefault((k != 1 and fast, decay), []).append(p)
    return torch.optim.AdamW(
        [
            {
                "params": ps,
                "lr": settings.lr * (k if fast else 1),
                "weight_decay": settings.weight_decay if decay else 0.0,
            }
            for (fast, decay), ps in sorted(groups.items(), key=lambda g: (g[0][0], not g[0][1]))
        ],
        lr=settings.lr,
    )


def lr_factor(step, total, warmup, schedule):
    """Linear warmup to 1, then linear (or cosine) decay to 0, as HF's schedules."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return (
        max(0.0, 1 - progress) if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    )


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
def validation_loss(run) -> float:
    """Token-weighted mean loss over the validation examples, sharded across ranks."""
    examples, size = run.val_set, run.settings.batch_size * 2
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    chunks = [order[i:i + size] for i in range(0, len(order), size)][run.rank::run.world]
    run.raw.eval()
    total, tokens = 0.0, 0
    for chunk in chunks:
        batch = run.collate([examples[i] for i in chunk])
        tokens += int((batch["labels"] != -100).sum())  # counted on the host, before the copy
        total += token_loss_sum(run.raw, {k: v.to(run.device) for k, v in batch.items()}, run.autocast).item()
    run.raw.train()
    beat(run, run.progress.step, "validation sum")
    total, tokens = all_sum([total, tokens], run.device, run.world)
    return total / max(tokens, 1)


def validation_rouge(run) -> dict:
    """ROUGE-1/2/L (mean F over rows) of the evaluator's beam search on the first --eval-rouge validation
    dialogues. Each rank generates every world-th dialogue; outputs are gathered back into order, and
    since a summary does not depend on its batch, the scores equal a one-process run."""
    s, dialogues = run.settings, run.val_dialogues[:run.settings.eval_rouge]
    mine = summarize(run.raw, run.tokenizer, [d.dialogue for d in dialogues[run.rank::run.world]], s,
                     desc="validation ROUGE")
    run.raw.train()
    shards = [mine]
    if run.world > 1:
        beat(run, run.progress.step, "validation ROUGE")
        shards = [None] * run.world
        dist.all_gather_object(shards, mine)
    summaries = [None] * len(dialogues)
    for rank, shard in enumerate(shards):
        summaries[rank::run.world] = shard
    scores = metrics.rouge(summaries, [d.refs for d in dialogues], s.use_stemmer)["per_row"]
    return {k: round(scores[k], 6) for k in ("rouge1", "rouge2", "rougeL")}


def toml_value(v) -> str:
    """A setting as TOML: JSON's scalars and lists are TOML, except its Infinity and NaN (TOML: inf, nan)."""
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else "inf" if v > 0 else "-inf"
    return json.dumps(list(v) if isinstance(v, tuple) else v)


def save_settings(settings: Settings, path):
    """settings.toml: the exact run, readable back by --config or --resume."""
    skip = {"resume", "overwrite"}
    lines = [f"{k} = {toml_value(v)}" for k, v in vars(settings).items() if v is not None and k not in skip]
    checkpoint.atomic_write(path, "\n".join(lines) + "\n")


def load_examples(settings: Settings, tokenizer, log):
    """Tokenized train and validation examples and the validation dialogues, every `subsample`-th kept."""
    splits = data.load_splits(settings.data, ("train", "validation"))
    out = {}
    for name, dialogues in splits.items():
        out[name], cut = data.encode(dialogues[::settings.subsample], tokenizer,
                                     settings.max_source_len, settings.max_target_len)
        log(
            f"{name}: {len(out[name]):,} examples; {cut['truncated_sources']} dialogues shortened inside the "
            "prompt to "
            f"{settings.max_source_len} tokens, {cut['truncated_targets']} targets cut to "
            f"{settings.max_target_len}"
        )
    out["validation_dialogues"] = splits["validation"][::settings.subsample]
    return out


def check_resume_settings(settings: Settings, state: dict, world: int):
    """Refuse a resume whose flags would change the data order or the schedule, listing every change."""
    saved_path = os.path.join(settings.resume, SETTINGS_FILE)
    saved = {}
    if os.path.isfile(saved_path):
        saved = Settings(**read_run_settings(saved_path))
        normalize(saved)  # a run saved before --lora-variant existed says dora = true
        saved = vars(saved)
    free = resume_may_change(settings.best_metric)
    changed = [f"{k} {saved[k]!r} -> {v!r}" for k, v in vars(settings).items()
               if k in saved and k not in free and saved[k] != v]
    if state.get("world", world) != world:
        changed.append(f"processes {state['world']} -> {world}")
    if changed:
        raise UserError(
            f"--resume {settings.resume}: these settings differ from the run's and would change its data "
            f"order or schedule: {'; '.join(changed)}. Drop those flags, or start a new run with "
            "--output-dir"
        )


# ---------------------------------------------------------------- the run

@dataclass
class Progress:
    """The counters a resumed run continues, saved in trainer_state.pt as one key per field (the form runs
    saved before this class existed, so they resume too). window_*: the loss since the last train line of
    metrics.jsonl."""
    step: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    seconds: float = 0.0
    best_val_loss: float = float("inf")
    best_step: int = 0
    best_value: Optional[float] = None
    stale: int = 0  # validations in a row without improvement (--early-stop)
    window_loss: float = 0.0
    window_tokens: int = 0

    def state(self) -> dict:
        return asdict(self)

    @classmethod
    def restore(cls, state: dict) -> "Progress":
        """The fields a trainer state holds; a field it lacks (saved by an older version) keeps its start."""
        return cls(**{f.name: state[f.name] for f in fields(cls) if f.name in state})


@dataclass
class Run:
    """Everything the loop reads and updates, so each stage below is a short function of one argument."""
    settings: Settings
    rank: int
    world: int
    device: torch.device
    log: object
    tokenizer: object = None
    train_set: list = None
    val_set: list = None
    val_dialogues: list = None
    collate: object = None
    sampler: object = None
    loader: object = None
    model: torch.nn.Module = None  # DDP-wrapped under torchrun
    raw: torch.nn.Module = None    # the model itself
    optimizer: object = None
    scheduler: object = None
    autocast: object = None
    precision: tuple = None        # (name, why)
    steps_per_epoch: int = 0
    total: int = 0
    batches: object = None
    writer: object = None  # TensorBoard, rank 0 with --tensorboard
    resume_state: dict = (
        None  # trainer_state.pt of the checkpoint being resumed (less its optimizer, once loaded)
    )
    resume_from: str = None        # ... and its folder
    launcher: int = None           # torchrun's pid, the parent of this worker; None without torchrun
    saved: int = 0                 # the step last/ holds (0: none yet), for messages that name it
    heartbeat: Heartbeat = None    # under torchrun: where each rank is, so rank 0 can say whom it waits for
    progress: Progress = field(default_factory=Progress)

    @property
    def out(self):
        return self.settings.output_dir


def train(settings: Settings) -> dict:
    """Claim the output folder, set up, restore a resumed run, then loop: step, maybe validate, maybe save.
    Returns summary.json."""
    rank, world, device = setup_distributed()
    sharding.check(settings.fsdp, world)
    elastic_restart(settings, print if rank == 0 else (lambda *a, **k: None))
    run = Run(
        settings,
        rank,
        world,
        device,
        print if rank == 0 else (lambda *a, **k: None),
        launcher=os.getppid() if "LOCAL_RANK" in os.environ else None,
    )  # torchrun's workers are its children
    with claim_output(run), watching(run):
        set_up(run)
        restore(run)
        bar = tqdm(
            total=run.total, initial=run.progress.step, disable=run.rank != 0, desc="train", unit="step"
        )
        started = time.time() - run.progress.seconds
        with stop_signals() as caught:
            while not done(run):
                stop = train_step(run, started, bar, caught)
                validating = due_validation(run)
                if validating:
                    validate(run, bar)
                if validating or at(run.progress.step, run.settings.save_every) or stop:
                    save(run)
                if stop and not done(run):
                    bar.close()
                    raise Stopped(f"stopped by signal {stop} at step {run.progress.step}: saved "
                                  f"{os.path.join(run.out, 'last')}; continue with: {resume_command(run)}",
                                  128 + stop)
        bar.close()
        return finish(run)


def elastic_restart(settings: Settings, log):
    """torchrun --max-restarts N restarts every worker with the same command after one fails. A restart
    resumes the run from its last/ (it never starts over, whatever --overwrite said); with no checkpoint yet
    there is nothing to resume, and it is refused."""
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if not restart or settings.resume:
        return
    out = settings.output_dir
    if checkpoint.find(os.path.join(out, "last")) is None:
        raise UserError(
            f"torchrun restarted this run (restart {restart}), but {out} holds no checkpoint yet to "
            "resume from: start it again yourself (--overwrite)"
        )
    settings.resume, settings.overwrite = out, False
    log(f"torchrun restart {restart}: resuming {out} from its last checkpoint")


@contextmanager
def watching(run: Run):
    """Under torchrun, for the with-block: every rank publishes its place in the loop (beat), and rank 0
    logs the ranks it has waited for over DIALSUM_HEARTBEAT_S seconds (heartbeat.py)."""
    if run.world == 1:
        yield
        return
    run.heartbeat = Heartbeat(
        dist.distributed_c10d._get_default_store(),
        run.rank,
        run.world,
        lambda line: print(line, file=sys.stderr, flush=True),
    ).start()  # from a thread: at once
    try:
        yield
    finally:
        run.heartbeat.stop()


def beat(run: Run, step, phase):
    if run.heartbeat:
        run.heartbeat.beat(step, phase)


def done(run) -> bool:
    """All steps taken, or --early-stop validations in a row without improvement."""
    return run.progress.step >= run.total or stopped_early(run)


def stopped_early(run) -> bool:
    return bool(run.settings.early_stop) and run.progress.stale >= run.settings.early_stop


def due_validation(run) -> bool:
    """Every --eval-every steps (else at each epoch's end), and after the last step."""
    step, every = run.progress.step, run.settings.eval_every
    return (at(step, every) if every else step % run.steps_per_epoch == 0) or step == run.total


def at(step, every):
    return every > 0 and step % every == 0


def set_up(run: Run):
    """Data, model (+ LoRA), optimiser and schedule, before any step."""
    settings, rank, world, device = run.settings, run.rank, run.world, run.device
    if settings.tensorboard and rank == 0:
        run.writer = open_tensorboard(run)
    run.precision = choose_precision(settings.precision, device)
    run.autocast = autocast_for(settings.precision, device)
    run.log(f"precision: {run.precision[0]} ({run.precision[1]})")
    check_base_precision(settings.base_dtype, run.precision[0])

    run.tokenizer = load_tokenizer(settings.model)
    examples = load_examples(settings, run.tokenizer, run.log)
    run.train_set, run.val_set, run.val_dialogues = (
        examples["train"],
        examples["validation"],
        examples["validation_dialogues"],
    )
    run.sampler = data.LengthGroupedBatchSampler(
        [len(e["input_ids"]) for e in run.train_set],
        settings.batch_size,
        world,
        rank,
        settings.seed,
        accum=settings.grad_accum,
    )
    run.collate = data.Collator(run.tokenizer.pad_token_id)
    # Its own generator: iter(DataLoader) draws a seed, which must not shift the dropout RNG on resume.
    run.loader = DataLoader(run.train_set, batch_sampler=run.sampler, collate_fn=run.collate,
                            pin_memory=device.type == "cuda", generator=torch.Generator())

    torch.manual_seed(settings.seed)
    run.raw = set_dropout_impl(build_model(settings, run.resume_from, run.precision[0]),
                               settings.dropout_impl)
    run.raw.train()  # sharding.wrap puts it on the device
    if (
        settings.gradient_checkpointing
    ):  # T5's own, non-reentrant: LoRA layers get gradients behind frozen embeddings
        enable = (
            getattr(run.raw, "activation_checkpointing_enable", None) or run.raw.gradient_checkpointing_enable
        )
        enable({"use_reentrant": False})  # the first is transformers 5.x's name, the second 4.x's
        # memory over time in the allocator too: buffers of 1 MiB or more mapped, and given back when freed
        mmap_large_buffers(True)
    run.log(parameter_report(run.raw))
    if settings.eval_rouge:
        check_length(run.raw, settings)  # before the first step, not at the first validation
    run.model = sharding.wrap(run.raw, settings.fsdp, world, device, run.precision[0])

    run.steps_per_epoch = len(run.sampler) // settings.grad_accum  # >= 1: the sampler refuses less
    run.total = settings.max_steps or math.ceil(settings.epochs * run.steps_per_epoch)
    warmup = math.ceil(settings.warmup_ratio * run.total)
    run.optimizer = make_optimizer(run.raw, settings)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(
        run.optimizer, lambda s: lr_factor(s, run.total, warmup, settings.schedule))
    if rank == 0:
        save_settings(settings, os.path.join(run.out, SETTINGS_FILE))


@contextmanager
def claim_output(run: Run):
    """The output folder is the run's for the with-block, before any work. Rank 0 locks it (checkpoint.lock:
    a second run on it is refused, whether it starts, resumes or overwrites), then checks a new run's folder
    and, with --overwrite, empties it; every rank gets its verdict, so none sees a half-deleted folder. A
    resume then reads and checks its state on every rank."""
    s = run.settings
    with ExitStack() as held:
        verdict = [None]
        if run.rank == 0:
            try:  # a folder without a checkpoint is refused before it gets a lock file
                if s.resume and checkpoint.find(os.path.join(s.resume, "last")) is None:
                    raise UserError(f"--resume {s.resume}: no checkpoint there (expected "
                                    f"{os.path.join(s.resume, 'last', checkpoint.TRAINER_STATE)})")
                held.enter_context(checkpoint.lock(s.resume or run.out))
                if not s.resume:
                    checkpoint.prepare_output_dir(run.out, s.overwrite, SETTINGS_FILE, resumable=True)
            except UserError as e:
                verdict = [str(e)]
        if run.world > 1:
            dist.broadcast_object_list(verdict, src=0)
        if verdict[0]:
            raise UserError(verdict[0])
        if s.resume:
            last = checkpoint.find(
                os.path.join(s.resume, "last")
            )  # found again under the lock: no writer now
            run.resume_from, run.resume_state = last, checkpoint.load_state(last)
            if run.resume_state["is_adapter"] != s.is_lora:
                raise UserError(
                    f"--resume {s.resume}: it holds a {'LoRA' if run.resume_state['is_adapter'] else 'full'} "
                    f"run but --lora-rank is {s.lora_rank}"
                )
            if os.path.abspath(s.output_dir) != os.path.abspath(s.resume):
                raise UserError(
                    f"--resume {s.resume} continues that run in its own folder; drop --output-dir "
                    f"{s.output_dir} (copy the folder first to branch a run)"
                )
            check_resume_settings(s, run.resume_state, run.world)
        yield


def build_model(settings: Settings, resume_from, compute):
    """The base model with fresh LoRA layers, or the checkpoint being resumed; `compute` is the run's compute
    dtype, in which an nf4 base stores what it does not quantize."""
    if not settings.is_lora:
        return load_model(resume_from or settings.model, settings.dropout)
    model = load_model(settings.model, settings.dropout, settings.base_dtype or "fp32", compute)
    if resume_from:
        lora.load_adapter(model, resume_from)
    else:
        lora.inject(model, settings.lora_config())
    return model


def restore(run: Run):
    """Continue a resumed run exactly: optimiser, schedule, counters, this rank's RNG, best/ and the log."""
    state = run.resume_state
    if state is None:
        torch.manual_seed(run.settings.seed + run.rank)  # dropout masks differ per rank
        return
    # popped once loaded: on CUDA the optimizer holds GPU copies, and this CPU one would stay for the whole
    # run
    sharding.load_optimizer(run.model, run.optimizer, state.pop("optimizer"), run.resume_from)
    run.scheduler.load_state_dict(state["scheduler"])
    run.progress = Progress.restore(state)
    run.saved = run.progress.step
    checkpoint.set_rng_state(state["rng"][run.rank])
    if run.rank == 0:
        repair_best(run)
        trim_metrics(run)
    run.log(f"resumed from {run.resume_from} at step {run.progress.step}")


def repair_best(run: Run):
    """A crash between writing last/ and copying it to best/ leaves best/ behind: copy it now."""
    best, step = os.path.join(run.out, "best"), run.progress.best_step
    if step and step == run.progress.step and checkpoint.best_step(best) != step:
        checkpoint.save_best(run.resume_from, best, best_info(run))
        run.log(f"best/ was behind last/ (a crash between the two saves): repaired to step {step}")


def trim_metrics(run: Run):
    """Drop metrics.jsonl lines logged after the checkpoint (and blank or damaged lines, such as one a crash
    cut short, each named), rewriting the file whole."""
    path = os.path.join(run.out, METRICS_FILE)
    if os.path.isfile(path):
        notes = []
        kept = [line for line in read_metrics(path, notes) if line["step"] <= run.progress.step]
        for note in notes:
            run.log(note)
        checkpoint.atomic_write(path, "".join(json.dumps(line) + "\n" for line in kept))


def train_step(run: Run, started, bar, caught) -> int:
    """One optimiser step over an accumulation window: fetch it, backward through it, the one sync, the step.
    Returns the signal to stop on (0 = go on): every rank learns of a signal any rank caught during the step,
    through the collective that sums the loss, and stops with the others when any rank's launcher is gone
    (see launcher_gone).

    The loss of the window is summed over tokens on every rank and divided by the window's target
    tokens over all ranks (see the module docstring)."""
    window = next_window(run)
    counts, loss_sum = backward(run, window)
    synced = sync(run, counts, loss_sum, caught)
    take_step(run, synced, started, bar)
    return (
        signal.SIGINT if synced.sigint else signal.SIGTERM if synced.sigterm else 0
    )  # the same on every rank


def next_window(run: Run) -> list:
    """The --grad-accum micro-batches of the next step; the sampler restarts at each epoch (and at a resumed
    step, mid-epoch)."""
    epoch, within = divmod(run.progress.step, run.steps_per_epoch)
    if run.batches is None or within == 0:
        run.sampler.set_epoch(epoch, within * run.settings.grad_accum)
        run.batches = iter(run.loader)
    return [next(run.batches) for _ in range(run.settings.grad_accum)]


def backward(run: Run, window):
    """Gradients of the window's summed token loss / its target tokens over all ranks. Returns the counts
    (target, source and padded tokens; on the device under torchrun) and the loss sum, neither read yet."""
    # Counted on the host, from the loader's tensors. Under torchrun every rank's backward needs the window's
    # target tokens over all ranks: summed on the device, and read only with the loss, in sync().
    counts = [
        sum(int((b["labels"] != -100).sum()) for b in window),
        sum(int(b["attention_mask"].sum()) for b in window),
        sum(b["input_ids"].numel() + b["labels"].numel() for b in window),
    ]
    tgt = counts[0]
    if run.world > 1:
        beat(run, run.progress.step + 1, "batch")
        counts = on_device(counts, run.device)
        dist.all_reduce(counts)
        tgt = counts[0]
    loss_sum = torch.zeros((), device=run.device)
    beat(run, run.progress.step + 1, "forward")
    for i, batch in enumerate(window):
        batch = {k: v.to(run.device, non_blocking=True) for k, v in batch.items()}
        with (nullcontext() if i == len(window) - 1 else sharding.no_sync(run.model)):
            loss = token_loss_sum(run.model, batch, run.autocast)
            if i == len(window) - 1:
                beat(run, run.progress.step + 1, "gradients")
            (loss * run.world / tgt).backward()  # DDP averages over ranks; * world undoes that
        loss_sum += loss.detach()
    return counts, loss_sum


class Synced(NamedTuple):
    """What every rank knows after the step's one sync: the window's counts and loss over all ranks, and
    whether any rank caught SIGINT or SIGTERM or lost its launcher."""
    target_tokens: float
    source_tokens: float
    padded_tokens: float
    loss_sum: float
    sigint: bool
    sigterm: bool
    orphaned: bool


def sync(run: Run, counts, loss_sum, caught) -> Synced:
    """The step's one wait on the device: the loss, read once. Under torchrun it is summed with every rank's
    stop flags in one collective, and read together with the counts."""
    signum = caught["signum"]
    flags = [signum == signal.SIGINT, signum == signal.SIGTERM, launcher_gone(run)]
    if run.world > 1:
        beat(run, run.progress.step + 1, "loss")
        summed = torch.cat([loss_sum.double().view(1), on_device(flags, run.device)])
        dist.all_reduce(summed)
        tgt, src, padded, loss_total, *flags = torch.cat([counts, summed]).tolist()
    else:
        (tgt, src, padded), loss_total = counts, loss_sum.item()
    return Synced(tgt, src, padded, loss_total, *(bool(f) for f in flags))


def take_step(run: Run, synced: Synced, started, bar):
    """The optimizer and schedule step, and its bookkeeping: counters, the progress bar, a train line of
    metrics.jsonl every --log-every steps. A step no rank may take (a launcher gone, a loss not finite) stops
    the run before it changes the weights or writes a line."""
    s, p = run.settings, run.progress
    tgt = synced.target_tokens
    if synced.orphaned:  # any rank's: all stop here
        bar.close()
        raise UserError(f"the launcher of this run (torchrun, pid {run.launcher}) is gone: stopped at step "
                        f"{p.step} before taking the next; {saved_note(run)}")
    step_loss = synced.loss_sum / tgt
    if not math.isfinite(step_loss):
        bar.close()
        raise UserError(
            f"loss is {step_loss} at step {p.step + 1}: training diverged (learning rate too high?); "
            f"nothing was saved after it; {saved_note(run)}"
        )
    if s.clip > 0:
        torch.nn.utils.clip_grad_norm_(run.raw.parameters(), s.clip)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)

    p.step += 1
    p.tokens += int(tgt + synced.source_tokens)
    p.padded_tokens += int(synced.padded_tokens)
    p.seconds = time.time() - started
    p.window_loss += step_loss * tgt
    p.window_tokens += tgt
    bar.update(1)
    bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{line_base(run)['lr']:.2e}",
                    tok_s=f"{p.tokens / max(p.seconds, 1e-9):.0f}")
    if p.step % s.log_every == 0:
        write_metrics(run, {**line_base(run), "loss": round(p.window_loss / p.window_tokens, 6)})
        p.window_loss, p.window_tokens = 0.0, 0


def saved_note(run: Run) -> str:
    """What a stopped run left to continue from, as it is: last/'s step, or that nothing was saved yet."""
    last = os.path.join(run.out, "last")
    if not run.saved:
        return (f"no checkpoint was saved before it ({last} is written at each validation and every "
                "--save-every steps)")
    return f"the last good checkpoint is {last}, step {run.saved}: continue with {resume_command(run)}"


def resume_command(run: Run) -> str:
    """The command that continues this run: under torchrun the same launcher and process count (a resume
    refuses any other), else plain python."""
    if run.world == 1:
        return f"python train.py --resume {run.out}"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", run.world))
    nodes = f"--nnodes {run.world // local} ... " if run.world != local else "--standalone "
    return f"torchrun {nodes}--nproc_per_node {local} train.py --resume {run.out}"


def launcher_gone(run: Run) -> bool:
    """torchrun starts each worker in a session of its own, so a killed launcher leaves its workers running,
    writing the run's folder that a new run may be writing too. A worker whose parent has changed stops."""
    return run.launcher is not None and os.getppid() != run.launcher


def line_base(run: Run) -> dict:
    """The fields every metrics.jsonl line carries; train lines add loss, validation lines val_loss (+
    ROUGE)."""
    p = run.progress
    return {"step": p.step, "lr": run.scheduler.get_last_lr()[0], "tokens": p.tokens,
            "seconds": round(p.seconds, 3)}


def write_metrics(run: Run, line: dict):
    if run.rank != 0:
        return
    with open(os.path.join(run.out, METRICS_FILE), "a") as f:
        f.write(json.dumps(line) + "\n")
    if run.writer:
        for key, value in line.items():
            if key != "step":
                run.writer.add_scalar(key, value, line["step"])
        run.writer.flush()


def validate(run: Run, bar):
    """Validation loss (and ROUGE with --eval-rouge), logged; updates the best and the count of
    validations without improvement that --early-stop reads."""
    s, p = run.settings, run.progress
    beat(run, p.step, "validation")
    with sharding.whole(run.model):
        val = validation_loss(run)
        line = {**line_base(run), "val_loss": round(val, 6)}
        if s.eval_rouge:
            line.update(validation_rouge(run))
    write_metrics(run, line)
    bar.set_postfix(
        val_loss=f"{val:.4f}", **{k: f"{line[k]:.4f}" for k in ("rouge1", "rouge2", "rougeL") if k in line}
    )
    p.best_val_loss = min(val, p.best_val_loss)
    value = line[s.best_metric]
    better = p.best_value is None or (
        value < p.best_value if s.best_metric == "val_loss" else value > p.best_value
    )
    if better:
        p.best_step, p.best_value, p.stale = p.step, value, 0
    else:
        p.stale += 1
    if stopped_early(run):
        run.log(f"early stop: {s.best_metric} has not improved for {s.early_stop} validations; "
                f"best/ is step {p.best_step}")


def best_info(run: Run) -> dict:
    p = run.progress
    return {"step": p.best_step, "metric": run.settings.best_metric, "value": p.best_value}


def save(run: Run):
    """last/ with every rank's RNG state; best/ from it when this step is the best so far. Every rank
    takes part: under --fsdp the weights are gathered to rank 0 and each rank writes its optimizer shards."""
    beat(run, run.progress.step, "save")
    rng = [checkpoint.rng_state()]
    if run.world > 1:
        rng = [None] * run.world
        dist.all_gather_object(rng, checkpoint.rng_state())
    last = os.path.join(run.out, "last")
    optimizer, shards = sharding.optimizer_state(run.model, run.optimizer)
    state = {"optimizer": optimizer, "scheduler": run.scheduler.state_dict(), "rng": rng, "world": run.world,
             **run.progress.state()}
    with sharding.full_weights(run.raw, run.settings.is_lora) as model:
        checkpoint.save(
            last,
            model,
            run.tokenizer,
            run.settings.model,
            state,
            shards=shards,
            lead=run.rank == 0,
            barrier=dist.barrier if shards else None,
        )
    run.saved = run.progress.step
    if run.rank == 0 and run.progress.best_step == run.progress.step:
        checkpoint.save_best(last, os.path.join(run.out, "best"), best_info(run))
    if run.world > 1:
        beat(run, run.progress.step, "saved")
        dist.barrier()


@contextmanager
def stop_signals():
    """SIGINT and SIGTERM (Ctrl-C, cluster preemption) ask the loop to save and stop at the next step.

    Both handlers are installed explicitly: a run started in the background by a script inherits SIGINT
    as ignored and would never see it. One Ctrl-C or preemption often arrives twice (torchrun forwards
    what the terminal or scheduler already sent each rank), so a repeat within 5 s is the same request;
    a later one stops at once, the last checkpoint intact."""
    caught = {"signum": 0, "at": 0.0}

    def handler(signum, frame):
        if caught["signum"] and time.monotonic() - caught["at"] > 5:
            raise KeyboardInterrupt
        if not caught["signum"]:
            caught.update(signum=signum, at=time.monotonic())

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def open_tensorboard(run: Run):
    """A SummaryWriter for the same scalars as metrics.jsonl (the source of truth); events after a resumed
    step are purged so a curve never shows the steps a crash lost twice."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install -e \".[tensorboard]\"")
    resumed_at = run.resume_state["step"] if run.resume_state else 0
    return SummaryWriter(os.path.join(run.out, "tensorboard"), purge_step=resumed_at + 1)


def finish(run: Run) -> dict:
    """summary.json; the processes leave their group."""
    p = run.progress
    trainable, all_params = count_parameters(run.raw)
    summary = {
        "trainable_parameters": trainable,
        "all_parameters": all_params,
        "steps": p.step,
        "seconds": round(p.seconds, 1),
        "best_val_loss": p.best_val_loss,
        **{f"best_{k}": v for k, v in best_info(run).items()},
        "precision": run.precision[0],
        "precision_reason": run.precision[1],
        "tokens": p.tokens,
        "tokens_per_second": round(p.tokens / max(p.seconds, 1e-9), 1),
        "padding_fraction": round(1 - p.tokens / max(p.padded_tokens, 1), 4),
        "processes": run.world,
        "global_batch": run.settings.batch_size * run.world * run.settings.grad_accum,
    }
    if run.rank == 0:
        checkpoint.atomic_write(os.path.join(run.out, "summary.json"), json.dumps(summary, indent=2) + "\n")
        run.log(json.dumps(summary, indent=2))
        if run.writer:
            run.writer.close()
    if run.world > 1:
        dist.destroy_process_group()
    return summary

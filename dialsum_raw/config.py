"""Settings: one dataclass for every run, filled from a TOML file and then from flags, validated once.

Precedence is dataclass default < config file < command-line flag. Config keys are the field
names (``lora_rank`` or ``lora-rank``); an unknown key is an error that names the key and file.
"""

import argparse
import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from typing import Optional

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from .errors import UserError

LORA_TARGETS = ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo")
LORA_INITS = ("kaiming", "gaussian", "pissa")
BEST_METRICS = ("val_loss", "rouge1", "rouge2", "rougeL")


@dataclass
class Settings:
    # what to train / evaluate
    model: str = "google/flan-t5-small"
    data: str = "knkarthick/dialogsum"
    output_dir: str = "runs/notebook-lora"
    # LoRA (rank 0 = full fine-tuning)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: tuple = ("q", "v")
    rslora: bool = False
    dora: bool = False
    lora_init: str = "kaiming"
    lora_plus_ratio: float = 1.0
    # optimisation
    lr: float = 1e-3
    batch_size: int = 8
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int = 0
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    schedule: str = "linear"
    clip: float = 1.0
    dropout: Optional[float] = None
    precision: str = "auto"
    seed: int = 42
    # data
    max_source_len: int = 512
    max_target_len: int = 128
    subsample: int = 1
    # bookkeeping
    eval_every: int = 0
    log_every: int = 10
    save_every: int = 0
    eval_rouge: int = 0
    best_metric: str = "val_loss"
    early_stop: int = 0
    tensorboard: bool = False
    gradient_checkpointing: bool = False
    resume: Optional[str] = None
    overwrite: bool = False
    # evaluation / generation
    instruct: Optional[str] = None
    adapter: Optional[str] = None
    split: str = "test"
    limit: int = 0
    eval_batch_size: int = 32
    num_beams: int = 4
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    use_stemmer: bool = True
    show: tuple = field(default=())
    engine: str = "own"
    bootstrap: int = 1000

    @property
    def is_lora(self) -> bool:
        return self.lora_rank > 0


def _csv(kind):
    def parse(text):
        try:
            return tuple(kind(t.strip()) for t in str(text).split(",") if t.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return parse


# field -> (flag, parser, help). Each front end picks the fields it exposes.
FLAGS = {
    "model": ("--model", str, "hub id or local folder of the base model"),
    "data": ("--data", str, "DialogSum: hub id, a folder of jsonl (official) or csv (hub) files"),
    "output_dir": ("--output-dir", str, "where checkpoints, metrics and reports go"),
    "lora_rank": ("--lora-rank", int, "LoRA rank r; 0 = full fine-tuning"),
    "lora_alpha": ("--lora-alpha", float, "LoRA alpha (scale = alpha/r)"),
    "lora_dropout": ("--lora-dropout", float, "dropout on the LoRA input"),
    "lora_targets": ("--lora-targets", _csv(str), f"comma list from {','.join(LORA_TARGETS)}"),
    "rslora": ("--rslora", "flag", "scale by alpha/sqrt(r) instead of alpha/r"),
    "dora": ("--dora", "flag", "DoRA: a trained per-row magnitude times the normalized W + BA"),
    "lora_init": ("--lora-init", str, "how A and B start: kaiming, gaussian or pissa"),
    "lora_plus_ratio": ("--lora-plus-ratio", float, "LoRA+: B's learning rate is K x A's (1 = plain LoRA)"),
    "lr": ("--lr", float, "peak learning rate"),
    "batch_size": ("--batch-size", int, "examples per process per micro-batch"),
    "grad_accum": ("--grad-accum", int, "micro-batches per optimizer step"),
    "epochs": ("--epochs", float, "passes over the training data (ignored with --max-steps)"),
    "max_steps": ("--max-steps", int, "stop after this many optimizer steps (0 = use --epochs)"),
    "warmup_ratio": ("--warmup-ratio", float, "fraction of steps with linear warmup"),
    "weight_decay": ("--weight-decay", float, "AdamW weight decay (never on norms or biases)"),
    "schedule": ("--schedule", str, "decay after warmup: linear or cosine"),
    "clip": ("--clip", float, "gradient-norm clipping (0 = off)"),
    "dropout": ("--dropout", float, "override the model's dropout rate"),
    "precision": ("--precision", str, "auto (bf16 on CUDA and on CPUs that multiply bf16 natively, else fp32), "
                                      "bf16 or fp32"),
    "seed": ("--seed", int, "seed for init, shuffling and dropout"),
    "max_source_len": ("--max-source-len", int, "source tokens kept (prompt + dialogue)"),
    "max_target_len": ("--max-target-len", int, "summary tokens kept"),
    "subsample": ("--subsample", int, "keep every K-th example of each split (the notebook: 100)"),
    "eval_every": ("--eval-every", int, "validate and save every N steps (0 = every epoch)"),
    "log_every": ("--log-every", int, "write a metrics.jsonl line every N steps"),
    "save_every": ("--save-every", int, "also save last/ every N steps (0 = only at validation)"),
    "eval_rouge": ("--eval-rouge", int, "at each validation, ROUGE on the first N validation dialogues (0 = off)"),
    "best_metric": ("--best-metric", str, "what picks best/: val_loss, rouge1, rouge2 or rougeL"),
    "early_stop": ("--early-stop", int, "stop after K validations without improvement (0 = never)"),
    "tensorboard": ("--tensorboard", "flag", "also write scalars for TensorBoard (pip install -e '.[tensorboard]')"),
    "gradient_checkpointing": ("--gradient-checkpointing", "flag",
                               "recompute activations in backward: less memory, more compute"),
    "resume": ("--resume", str, "continue the run saved in this output dir"),
    "overwrite": ("--overwrite", "flag", "replace an existing output dir"),
    "instruct": ("--instruct", str, "a full fine-tuned checkpoint folder ('instruct' model)"),
    "adapter": ("--adapter", str, "a LoRA adapter folder applied to --base ('peft' model)"),
    "split": ("--split", str, "train, validation or test"),
    "limit": ("--limit", int, "evaluate the first N dialogues (0 = all)"),
    "eval_batch_size": ("--batch-size", int, "dialogues per generate call"),
    "num_beams": ("--num-beams", int, "beam width"),
    "max_new_tokens": ("--max-new-tokens", int, "most summary tokens generated"),
    "min_new_tokens": ("--min-new-tokens", int, "fewest summary tokens generated"),
    "length_penalty": ("--length-penalty", float, "beam score length exponent"),
    "no_repeat_ngram_size": ("--no-repeat-ngram-size", int, "forbid repeated n-grams (0 = off)"),
    "use_stemmer": ("--use-stemmer", "flag", "Porter stemming in ROUGE"),
    "show": ("--show", _csv(int), "dialogue indices to print side by side, e.g. 200,201"),
    "engine": ("--engine", str, "beam search: own (T5-family, fast) or hf (model.generate, any model)"),
    "bootstrap": ("--bootstrap", int, "paired-bootstrap resamples for the report's confidence intervals"),
}


def build_parser(fields, description, renames=None, required=()):
    """An argparse parser over a subset of Settings; every default is None so files can fill in.
    Fields named in `required` must be given on the command line."""
    renames = renames or {}
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a TOML file from configs/; flags override it")
    defaults = Settings()
    for name in fields:
        flag, kind, help_text = FLAGS[name]
        flag = renames.get(name, flag)
        shown = getattr(defaults, name)
        if shown not in (None, ()) and kind != "flag":
            help_text = f"{help_text} (default: {','.join(map(str, shown)) if isinstance(shown, tuple) else shown})"
        if kind == "flag":
            help_text += f" (default: {'on' if shown else 'off'})"
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=name, type=kind, default=None, required=name in required, help=help_text)
    return parser


# What a TOML value must be for each annotation of Settings, named as in the error message.
_TOML_TYPES = {bool: (bool, "true or false"), int: (int, "an integer"), float: ((int, float), "a number"),
               str: (str, "a string"), tuple: (list, "a list")}


def _field_type(f):
    """The plain type of a Settings field: Optional[X] -> X."""
    kind = f.type
    return next(a for a in kind.__args__ if a is not type(None)) if getattr(kind, "__args__", None) else kind


def _typed(path, key, value, kind):
    """`value` as the field's type, or a UserError 'FILE: key: expected an integer, got 8.9'."""
    allowed, what = _TOML_TYPES[kind]
    if isinstance(value, bool) and kind is not bool or not isinstance(value, allowed):
        raise UserError(f"{path}: {key}: expected {what}, got {value!r}")
    if kind is tuple:
        item = int if key.replace("-", "_") == "show" else str
        if not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
            raise UserError(f"{path}: {key}: expected a list of {'integers' if item is int else 'strings'}, got {value!r}")
        return tuple(value)
    return float(value) if kind is float else value


def read_config(path):
    """A TOML config as a {field: value} dict; unknown keys and values of the wrong type name the file."""
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e})")
    names = {f.name: f for f in dataclasses.fields(Settings)}
    values = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UserError(f"{path}: unknown config key '{key}'{hint}")
        values[name] = _typed(path, key, value, _field_type(names[name]))
    return values


def settings_from(args, default_config=None):
    """Merge defaults < config file < flags, then validate. `args` is an argparse Namespace."""
    values = {}
    config = args.config or default_config
    if config:
        values.update(read_config(config))
    values.update({k: v for k, v in vars(args).items() if k != "config" and v is not None})
    settings = Settings(**{k: v for k, v in values.items() if k in Settings.__dataclass_fields__})
    validate(settings)
    return settings


def validate(s: Settings):
    """Every check on values in one place, with a message that says what to do."""
    def need(ok, message):
        if not ok:
            raise UserError(message)

    if str(s.precision).lower() in ("fp16", "float16", "half"):
        raise UserError("precision fp16 is refused: T5 overflows in fp16 (activations exceed 65504 "
                        "and the loss turns NaN); use bf16 or fp32")
    need(s.precision in ("auto", "bf16", "fp32"), f"--precision must be auto, bf16 or fp32, got {s.precision!r}")
    need(s.lora_rank >= 0, f"--lora-rank must be >= 1 for LoRA (or 0 for full fine-tuning), got {s.lora_rank}")
    if s.is_lora:
        need(s.lora_alpha > 0, f"--lora-alpha must be > 0, got {s.lora_alpha}")
        need(0 <= s.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {s.lora_dropout}")
        need(len(s.lora_targets) > 0, "--lora-targets is empty; give e.g. q,v")
        bad = [t for t in s.lora_targets if t not in LORA_TARGETS]
        if bad:
            raise UserError(f"unknown LoRA target {bad[0]!r}; choose from {', '.join(LORA_TARGETS)}")
        need(s.lora_init in LORA_INITS, f"--lora-init must be one of {', '.join(LORA_INITS)}, got {s.lora_init!r}")
        need(s.lora_plus_ratio > 0, f"--lora-plus-ratio must be > 0, got {s.lora_plus_ratio}")
    else:
        variant = [flag for flag, on in (("--dora", s.dora), ("--lora-init", s.lora_init != "kaiming"),
                                         ("--lora-plus-ratio", s.lora_plus_ratio != 1), ("--rslora", s.rslora)) if on]
        need(not variant, f"{variant[0] if variant else ''} is a LoRA setting, but --lora-rank 0 is full fine-tuning")
    need(s.lr > 0, f"--lr must be > 0, got {s.lr}")
    need(s.batch_size >= 1, f"--batch-size must be >= 1, got {s.batch_size}")
    need(s.eval_batch_size >= 1, f"--batch-size must be >= 1, got {s.eval_batch_size}")
    need(s.grad_accum >= 1, f"--grad-accum must be >= 1, got {s.grad_accum}")
    need(s.max_steps >= 0, f"--max-steps must be >= 0, got {s.max_steps}")
    need(s.max_steps > 0 or s.epochs > 0, f"--epochs must be > 0 (or set --max-steps), got {s.epochs}")
    need(0 <= s.warmup_ratio < 1, f"--warmup-ratio must be in [0, 1), got {s.warmup_ratio}")
    need(s.weight_decay >= 0, f"--weight-decay must be >= 0, got {s.weight_decay}")
    need(s.schedule in ("linear", "cosine"), f"--schedule must be linear or cosine, got {s.schedule!r}")
    need(s.clip >= 0, f"--clip must be >= 0, got {s.clip}")
    need(s.dropout is None or 0 <= s.dropout < 1, f"--dropout must be in [0, 1), got {s.dropout}")
    need(s.max_source_len >= 8 and s.max_target_len >= 2,
         f"--max-source-len must be >= 8 and --max-target-len >= 2, got {s.max_source_len}, {s.max_target_len}")
    need(s.subsample >= 1, f"--subsample must be >= 1, got {s.subsample}")
    need(s.eval_every >= 0 and s.log_every >= 1, "--eval-every must be >= 0 and --log-every >= 1")
    need(s.save_every >= 0, f"--save-every must be >= 0, got {s.save_every}")
    need(s.eval_rouge >= 0, f"--eval-rouge must be >= 0, got {s.eval_rouge}")
    need(s.best_metric in BEST_METRICS, f"--best-metric must be one of {', '.join(BEST_METRICS)}, got {s.best_metric!r}")
    need(s.best_metric == "val_loss" or s.eval_rouge > 0,
         f"--best-metric {s.best_metric} needs ROUGE during training: add --eval-rouge N (e.g. 100)")
    need(s.early_stop >= 0, f"--early-stop must be >= 0, got {s.early_stop}")
    need(s.engine in ("own", "hf"), f"--engine must be own or hf, got {s.engine!r}")
    need(s.bootstrap >= 1, f"--bootstrap must be >= 1, got {s.bootstrap}")
    need(s.split in ("train", "validation", "test"), f"--split must be train, validation or test, got {s.split!r}")
    need(s.limit >= 0, f"--limit must be >= 0, got {s.limit}")
    need(s.num_beams >= 1 and s.max_new_tokens >= 1, "--num-beams and --max-new-tokens must be >= 1")
    need(0 <= s.min_new_tokens <= s.max_new_tokens, "--min-new-tokens must be in [0, --max-new-tokens]")
    need(s.no_repeat_ngram_size >= 0, "--no-repeat-ngram-size must be >= 0")
    s.lora_targets = tuple(s.lora_targets)
    s.show = tuple(s.show)

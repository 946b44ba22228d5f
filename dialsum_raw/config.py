"""Settings: one dataclass for every run, filled from a TOML file and then from flags, validated once.

Precedence is dataclass default < config file < command-line flag. Config keys are the field
names (``lora_rank`` or ``lora-rank``); an unknown key is an error that names the key and file.
"""

import argparse
import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from typing import Optional

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from .errors import UserError, need
from .lora import INITS, VARIANTS, LoRAConfig
from .lora.config import expected_type
from .modeling import BASE_DTYPES, STORAGE_RULE

LORA_TARGETS = ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo")
LORA_VARIANTS, LORA_INITS = (
    tuple(VARIANTS),
    tuple(INITS),
)  # the lora package's tables: a new one needs no edit here
BEST_METRICS = ("val_loss", "rouge1", "rouge2", "rougeL")

# The fronts a setting can appear on, and what --resume may do with a train.py setting:
# "fixed" (the default) changes what the run learns or in which order, so a resume refuses it;
# "free" changes how the run is watched, saved or computed; "rouge" is free while val_loss picks best/.
TRAIN, EVALUATE, SUMMARIZE = "train", "evaluate", "summarize"
ALL = (TRAIN, EVALUATE, SUMMARIZE)


def option(default, help, fronts=(), resume="fixed", choices=None, flags=None, repeat=False):
    """A Settings field that declares its own command-line form: `help`, the `fronts` (train / evaluate /
    summarize) that expose it, its resume policy and its allowed values. The flag is the field name with
    dashes (--lora-rank) unless `flags` names another one for a front ({"evaluate": "--base"}). A `repeat`
    field (a tuple) takes its flag once per value (--adapter a=DIR --adapter b=DIR) instead of a comma
    list."""
    return field(default=default, metadata={"help": help, "fronts": fronts, "resume": resume,
                                            "choices": choices, "flags": flags or {}, "repeat": repeat})


@dataclass
class Settings:
    # what to train / evaluate
    model: str = option("google/flan-t5-small", "hub id or local folder of the base model", ALL,
                        flags={EVALUATE: "--base"})
    data: str = option(
        "knkarthick/dialogsum",
        "DialogSum: hub id, a folder of jsonl (official) or csv (hub) files",
        (TRAIN, EVALUATE),
    )
    output_dir: str = option(
        "runs/notebook-lora", "where checkpoints, metrics and reports go", (TRAIN, EVALUATE), resume="free"
    )
    # LoRA (rank 0 = full fine-tuning)
    lora_rank: int = option(8, "LoRA rank r; 0 = full fine-tuning", (TRAIN,))
    lora_alpha: float = option(16.0, "LoRA alpha (scale = alpha/r)", (TRAIN,))
    lora_dropout: float = option(0.05, "dropout on the LoRA input", (TRAIN,))
    lora_targets: tuple = option(("q", "v"), f"comma list from {','.join(LORA_TARGETS)}", (TRAIN,))
    lora_variant: str = option("lora", "; ".join(f"{name}: {cls.SUMMARY}" for name, cls in VARIANTS.items()),
                               (TRAIN,), choices=LORA_VARIANTS)
    dora: bool = option(False, "the same as --lora-variant dora", (TRAIN,))
    vera_rank: int = option(256, "rank of VeRA's shared random projections", (TRAIN,))
    rslora: bool = option(False, "scale by alpha/sqrt(r) instead of alpha/r", (TRAIN,))
    lora_init: str = option("kaiming", "how A and B start", (TRAIN,), choices=LORA_INITS)
    loftq_iter: int = option(
        1, "--lora-init loftq: alternations of nf4 quantization and rank-r fit", (TRAIN,)
    )
    lora_plus_ratio: float = option(1.0, "LoRA+: B's learning rate is K x A's (1 = plain LoRA)", (TRAIN,))
    # optimisation
    lr: float = option(1e-3, "peak learning rate", (TRAIN,))
    # --batch-size is two settings: examples per micro-batch for train.py, dialogues per generate call for
    # evaluate.py (eval_batch_size, below). Each front exposes one of them under that flag.
    batch_size: int = option(8, "examples per process per micro-batch", (TRAIN,))
    grad_accum: int = option(1, "micro-batches per optimizer step", (TRAIN,))
    epochs: float = option(1.0, "passes over the training data (ignored with --max-steps)", (TRAIN,))
    max_steps: int = option(0, "stop after this many optimizer steps (0 = use --epochs)", (TRAIN,))
    warmup_ratio: float = option(0.0, "fraction of steps with linear warmup", (TRAIN,))
    weight_decay: float = option(0.0, "AdamW weight decay (never on norms or biases)", (TRAIN,))
    schedule: str = option("linear", "decay after warmup", (TRAIN,), choices=("linear", "cosine"))
    clip: float = option(1.0, "gradient-norm clipping (0 = off)", (TRAIN,))
    dropout: Optional[float] = option(None, "override the model's dropout rate", (TRAIN,))
    dropout_impl: str = option(
        "fast",
        "dropout masks: fast (cheap 16-bit lanes) or torch (nn.Dropout bit for bit)",
        (TRAIN,),
        choices=("fast", "torch"),
    )
    precision: str = option("auto", "auto (bf16 on CUDA and on CPUs that multiply bf16 natively, else fp32), "
                            "bf16 or fp32", ALL, resume="free", choices=("auto", "bf16", "fp32"))
    gradient_checkpointing: bool = option(
        False, "recompute activations in backward, and give each freed buffer of 1 MiB or more back to the "
        "system at once: less memory, more compute", (TRAIN,), resume="free"
    )
    base_dtype: Optional[str] = option(
        None,
        f"how the frozen base is stored (default fp32; evaluate and summarize: "
        f"as the adapter was trained). {STORAGE_RULE}",
        ALL,
        choices=BASE_DTYPES,
    )
    fsdp: bool = option(False, "shard parameters, gradients and optimizer state with FSDP2 (needs torchrun)",
                        (TRAIN,))
    seed: int = option(42, "seed for init, shuffling and dropout", (TRAIN,))
    # data
    max_source_len: int = option(512, "source tokens kept (prompt + dialogue)", ALL)
    max_target_len: int = option(128, "summary tokens kept", (TRAIN,))
    subsample: int = option(1, "keep every K-th example of each split (the notebook: 100)", (TRAIN,))
    # bookkeeping
    eval_every: int = option(0, "validate and save every N steps (0 = every epoch)", (TRAIN,), resume="free")
    log_every: int = option(10, "write a metrics.jsonl line every N steps", (TRAIN,), resume="free")
    save_every: int = option(
        0, "also save last/ every N steps (0 = only at validation)", (TRAIN,), resume="free"
    )
    eval_rouge: int = option(
        0, "at each validation, ROUGE on the first N validation dialogues (0 = off)", (TRAIN,), resume="rouge"
    )
    best_metric: str = option("val_loss", "what picks best/", (TRAIN,), choices=BEST_METRICS)
    early_stop: int = option(
        0, "stop after K validations without improvement (0 = never)", (TRAIN,), resume="free"
    )
    tensorboard: bool = option(False, "also write scalars for TensorBoard (pip install -e '.[tensorboard]')",
                               (TRAIN,), resume="free")
    resume: Optional[str] = option(None, "continue the run saved in this output dir", (TRAIN,), resume="free")
    overwrite: bool = option(False, "replace an existing output dir", (TRAIN, EVALUATE), resume="free")
    # evaluation / generation
    instruct: tuple = option(
        (),
        "a full fine-tuned model folder: DIR (the 'instruct' model) or NAME=DIR; repeat "
        "for several, loaded one at a time",
        (EVALUATE,),
        repeat=True,
    )
    adapter: tuple = option(
        (),
        "a LoRA adapter folder applied to --base: DIR (the 'peft' model) or NAME=DIR; "
        "evaluate.py takes it repeatedly, applying each to the one base in turn",
        (EVALUATE, SUMMARIZE),
        repeat=True,
    )
    reference: Optional[str] = option(
        None,
        "the model every other is compared with in report.md, besides the "
        "original (default: the first adapter, else the first instruct model)",
        (EVALUATE,),
    )
    split: str = option(
        "test", "which split to evaluate", (EVALUATE,), choices=("train", "validation", "test")
    )
    limit: int = option(0, "evaluate the first N dialogues (0 = all)", (EVALUATE,))
    eval_batch_size: int = option(32, "dialogues per generate call", (EVALUATE,), resume="free",
                                  flags={EVALUATE: "--batch-size"})
    num_beams: int = option(4, "beam width", ALL, resume="rouge")
    max_new_tokens: int = option(128, "most summary tokens generated", ALL, resume="rouge")
    min_new_tokens: int = option(0, "fewest summary tokens generated", (EVALUATE,))
    length_penalty: float = option(1.0, "beam score length exponent", (EVALUATE,))
    no_repeat_ngram_size: int = option(0, "forbid repeated n-grams (0 = off)", (EVALUATE,))
    use_stemmer: bool = option(True, "Porter stemming in ROUGE", (EVALUATE,))
    show: tuple = option((), "dialogue indices to print side by side, e.g. 200,201", (EVALUATE,))
    engine: str = option("own", "beam search: own (T5-family, fast) or hf (model.generate, any model)", ALL,
                         resume="free", choices=("own", "hf"))
    quantize: str = option("none", "int8: dynamic int8 linear layers for quick previews (never for reported "
                           "ROUGE)", (EVALUATE, SUMMARIZE), choices=("none", "int8"))
    bootstrap: int = option(
        1000, "paired-bootstrap resamples for the report's confidence intervals", (EVALUATE,)
    )

    @property
    def is_lora(self) -> bool:
        return self.lora_rank > 0

    def lora_config(self) -> LoRAConfig:
        """The adapter these settings ask for; LoRAConfig refuses, in one line, a combination peft refuses."""
        return LoRAConfig(targets=self.lora_targets, rank=self.lora_rank, alpha=self.lora_alpha,
                          dropout=self.lora_dropout, rslora=self.rslora, variant=self.lora_variant,
                          init=self.lora_init, vera_rank=self.vera_rank, base_dtype=self.base_dtype or "fp32",
                          loftq_iter=self.loftq_iter)


def fields_of(front):
    """The Settings fields a front (train / evaluate / summarize) exposes, in declaration order."""
    return [f for f in dataclasses.fields(Settings) if front in f.metadata["fronts"]]


def flag_of(f, front=TRAIN) -> str:
    return f.metadata["flags"].get(front, "--" + f.name.replace("_", "-"))


def resume_may_change(best_metric: str) -> set:
    """train.py settings a --resume may change: the "free" ones, and the "rouge" ones while val_loss picks
    best/. Settings that train.py does not expose never matter to a run."""
    free = {"free", "rouge"} if best_metric == "val_loss" else {"free"}
    return {
        f.name
        for f in dataclasses.fields(Settings)
        if f.metadata["resume"] in free or TRAIN not in f.metadata["fronts"]
    }


def _csv(kind):
    def parse(text):
        try:
            return tuple(kind(t.strip()) for t in str(text).split(",") if t.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return parse


def _list_item(name):
    """What a tuple setting holds: integers for --show, strings otherwise."""
    return int if name == "show" else str


def build_parser(front, description, required=()):
    """An argparse parser over the fields `front` exposes; every default is None so files can fill in.
    Fields named in `required` must be given on the command line."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="a TOML file from configs/; flags override it")
    for f in fields_of(front):
        kind, shown, help_text = _field_type(f), f.default, f.metadata["help"]
        if f.metadata["choices"]:
            help_text += f" (one of: {', '.join(f.metadata['choices'])})"
        if kind is bool:
            parser.add_argument(
                flag_of(f, front),
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{help_text} (default: {'on' if shown else 'off'})",
            )
            continue
        if shown not in (None, ()):
            help_text += f" (default: {','.join(map(str, shown)) if isinstance(shown, tuple) else shown})"
        if f.metadata["repeat"]:
            parser.add_argument(flag_of(f, front), dest=f.name, action="append", default=None,
                                required=f.name in required, help=help_text)
            continue
        parse = _csv(_list_item(f.name)) if kind is tuple else kind
        parser.add_argument(
            flag_of(f, front),
            dest=f.name,
            type=parse,
            default=None,
            required=f.name in required,
            help=help_text,
        )
    return parser


def _field_type(f):
    """The plain type of a Settings field: Optional[X] -> X."""
    kind = f.type
    return next(a for a in kind.__args__ if a is not type(None)) if getattr(kind, "__args__", None) else kind


def typed(where, key, value):
    """`value` as setting `key`'s type, or a UserError 'WHERE: key: expected an integer, got 8.9' (config
    files and sweep grids alike)."""
    kind = _field_type(Settings.__dataclass_fields__[key.replace("-", "_")])
    what = expected_type(kind, value)
    if what:
        raise UserError(f"{where}: {key}: expected {what}, got {value!r}")
    if kind is tuple:
        item = _list_item(key.replace("-", "_"))
        if not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
            raise UserError(
                f"{where}: {key}: expected a list of {'integers' if item is int else 'strings'}, got "
                f"{value!r}"
            )
        return tuple(value)
    return float(value) if kind is float else value


def did_you_mean(name, names, cutoff=0.6) -> str:
    """ "; did you mean 'lora_rank'?" for the closest of `names`, or "" (config files and sweep grids
    alike)."""
    close = difflib.get_close_matches(name, names, n=1, cutoff=cutoff)
    return f"; did you mean '{close[0]}'?" if close else ""


def check_spellings(where, keys):
    """Refuse a table that gives one setting twice, as lora-rank and lora_rank: TOML sees two keys, and the
    last would silently win."""
    seen = {}
    for key in keys:
        other = seen.setdefault(key.replace("-", "_"), key)
        if other != key:
            raise UserError(f"{where}: '{other}' and '{key}' are the same setting; keep one")


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
    check_spellings(path, raw)
    values = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in names:
            raise UserError(f"{path}: unknown config key '{key}'{did_you_mean(name, names)}")
        values[name] = typed(path, key, value)
    return values


SETTINGS_FILE = "settings.toml"  # a run's exact settings, in its output folder
# Settings added after runs were already saved: a run whose settings.toml lacks one ran with this value,
# not with today's default, so a resume or a run table must read it so.
BEFORE_THEY_EXISTED = {"dropout_impl": "torch"}


def read_run_settings(path) -> dict:
    """A run's settings.toml as a {field: value} dict, with the values it ran with for settings it
    predates."""
    return {**BEFORE_THEY_EXISTED, **read_config(path)}


def settings_from(args, default_config=None):
    """Merge defaults < config file < flags, then validate. `args` is an argparse Namespace."""
    values = {}
    config = args.config or default_config
    if config:
        run = os.path.basename(config) == SETTINGS_FILE  # a run's own file (--resume): read as the run ran
        values.update(read_run_settings(config) if run else read_config(config))
    given = {
        k: tuple(v) if isinstance(v, list) else v
        for k, v in vars(args).items()
        if k != "config" and v is not None
    }
    values.update(given)
    settings = Settings(**{k: v for k, v in values.items() if k in Settings.__dataclass_fields__})
    validate(settings, given)
    return settings


def normalize(s: Settings):
    """--dora is an alias of --lora-variant dora, kept so older commands and settings.toml files still
    work."""
    if s.dora and s.lora_variant == "lora":
        s.lora_variant = "dora"
    s.dora = s.lora_variant == "dora"


UNBOUNDED = {"clip"}  # float settings where inf means something: --clip inf measures the norm, never clips


def validate(s: Settings, given=()):
    """Every check on values in one place, with a message that says what to do. `given`: the settings set on
    the command line, which may be refused where a config file's own value is not."""
    if str(s.precision).lower() in ("fp16", "float16", "half"):
        raise UserError("precision fp16 is refused: T5 overflows in fp16 (activations exceed 65504 "
                        "and the loss turns NaN); use bf16 or fp32")
    for f in dataclasses.fields(Settings):
        choices, value = f.metadata["choices"], getattr(s, f.name)
        if choices and value is not None and value not in choices:
            raise UserError(f"{flag_of(f)} must be one of {', '.join(choices)}, got {value!r}")
    for f in dataclasses.fields(Settings):  # inf and nan pass every range check below as a comparison would
        value = getattr(s, f.name)
        if (
            _field_type(f) is float
            and value is not None
            and not math.isfinite(value)
            and f.name not in UNBOUNDED
        ):
            raise UserError(f"{flag_of(f)} must be a finite number, got {value}")
    need(0 <= s.seed < 2 ** 63, f"--seed must be in [0, 2**63), got {s.seed}")
    need(not (s.dora and s.lora_variant not in ("lora", "dora")),
         f"--dora is the same as --lora-variant dora, but --lora-variant is {s.lora_variant}")
    normalize(s)
    need(
        s.lora_rank >= 0, f"--lora-rank must be >= 1 for LoRA (or 0 for full fine-tuning), got {s.lora_rank}"
    )
    if s.is_lora:
        need(s.lora_alpha > 0, f"--lora-alpha must be > 0, got {s.lora_alpha}")
        need(0 <= s.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {s.lora_dropout}")
        need(len(s.lora_targets) > 0, "--lora-targets is empty; give e.g. q,v")
        bad = [t for t in s.lora_targets if t not in LORA_TARGETS]
        if bad:
            raise UserError(f"unknown LoRA target {bad[0]!r}; choose from {', '.join(LORA_TARGETS)}")
        need(s.lora_plus_ratio > 0, f"--lora-plus-ratio must be > 0, got {s.lora_plus_ratio}")
        s.lora_config()
    else:
        variant = [flag for flag, on in (
            ("--dora" if "dora" in given else "--lora-variant", s.lora_variant != "lora"),
            ("--lora-init", s.lora_init != "kaiming"), ("--lora-plus-ratio", s.lora_plus_ratio != 1),
            ("--rslora", s.rslora),
            *((f"--{k.replace('_', '-')}", k in given) for k in ("lora_alpha", "lora_targets", "lora_dropout",
                                                                 "vera_rank", "loftq_iter"))) if on]
        need(
            not variant,
            f"{variant[0] if variant else ''} is a LoRA setting, but --lora-rank 0 is full fine-tuning",
        )
    if s.base_dtype not in (None, "fp32"):
        need(
            s.is_lora,
            f"--base-dtype {s.base_dtype} stores the base frozen, but --lora-rank 0 (full fine-tuning) "
            "trains every weight in fp32: drop --base-dtype or train LoRA (--lora-rank R)",
        )
        need(
            not s.fsdp,
            f"--fsdp shards an fp32 base only; with --base-dtype {s.base_dtype} drop --fsdp (an nf4 base "
            "is ~7x smaller than fp32, a bf16 one 2x) or use --base-dtype fp32",
        )
    need(s.lr > 0, f"--lr must be > 0, got {s.lr}")
    need(s.batch_size >= 1, f"--batch-size must be >= 1, got {s.batch_size}")
    need(s.eval_batch_size >= 1, f"--batch-size must be >= 1, got {s.eval_batch_size}")
    need(s.grad_accum >= 1, f"--grad-accum must be >= 1, got {s.grad_accum}")
    need(s.max_steps >= 0, f"--max-steps must be >= 0, got {s.max_steps}")
    need(s.max_steps > 0 or s.epochs > 0, f"--epochs must be > 0 (or set --max-steps), got {s.epochs}")
    need(0 <= s.warmup_ratio < 1, f"--warmup-ratio must be in [0, 1), got {s.warmup_ratio}")
    need(s.weight_decay >= 0, f"--weight-decay must be >= 0, got {s.weight_decay}")
    need(s.clip >= 0, f"--clip must be >= 0, got {s.clip}")
    need(s.dropout is None or 0 <= s.dropout < 1, f"--dropout must be in [0, 1), got {s.dropout}")
    need(
        s.max_source_len >= 8 and s.max_target_len >= 2,
        f"--max-source-len must be >= 8 and --max-target-len >= 2, got {s.max_source_len}, "
        f"{s.max_target_len}",
    )
    need(s.subsample >= 1, f"--subsample must be >= 1, got {s.subsample}")
    need(s.eval_every >= 0 and s.log_every >= 1, "--eval-every must be >= 0 and --log-every >= 1")
    need(s.save_every >= 0, f"--save-every must be >= 0, got {s.save_every}")
    need(s.eval_rouge >= 0, f"--eval-rouge must be >= 0, got {s.eval_rouge}")
    need(s.best_metric == "val_loss" or s.eval_rouge > 0,
         f"--best-metric {s.best_metric} needs ROUGE during training: add --eval-rouge N (e.g. 100)")
    need(s.early_stop >= 0, f"--early-stop must be >= 0, got {s.early_stop}")
    need(s.bootstrap >= 1, f"--bootstrap must be >= 1, got {s.bootstrap}")
    need(s.limit >= 0, f"--limit must be >= 0, got {s.limit}")
    need(s.num_beams >= 1 and s.max_new_tokens >= 1, "--num-beams and --max-new-tokens must be >= 1")
    need(0 <= s.min_new_tokens <= s.max_new_tokens, "--min-new-tokens must be in [0, --max-new-tokens]")
    need(s.no_repeat_ngram_size >= 0, "--no-repeat-ngram-size must be >= 0")
    need(
        all(i >= 0 for i in s.show), f"--show takes dialogue indices (>= 0), got {','.join(map(str, s.show))}"
    )

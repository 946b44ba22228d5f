"""LoRAConfig: the one description of an adapter. inject() takes it whole, every layer keeps it, and
adapter.json is asdict(config) plus the format and the base model's name."""

import math
from dataclasses import asdict, dataclass, fields

from ..errors import need
from ..modeling import BASE_DTYPES
from .init import INITS
from .layers import VARIANTS, layer_class

FORMAT = "dialsum_raw-lora/3"
OLD_FORMAT = "dialsum_raw-lora/1"  # rank/alpha of the saved form, "dora": bool, PiSSA's own rank in "pissa"
# Format 2 held every field of its day; fields added since keep the value every format-2 adapter had.
FORMAT_2, SINCE_3 = "dialsum_raw-lora/2", {"base_dtype": "fp32", "loftq_iter": 1}
# What a value read from a file (TOML, JSON) must be for each field type, named as in the error message.
FILE_TYPES = {bool: (bool, "true or false"), int: (int, "an integer"), float: ((int, float), "a number"),
              str: (str, "a string"), tuple: (list, "a list")}


def expected_type(kind, value):
    """None when a file's `value` fits a field of type `kind` (a bool is not a number), else what it must
    be."""
    allowed, what = FILE_TYPES[kind]
    return None if isinstance(value, allowed) and (kind is bool or not isinstance(value, bool)) else what


@dataclass(frozen=True)
class LoRAConfig:
    targets: tuple = ("q", "v")
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r
    variant: str = "lora"  # a key of layers.VARIANTS: the layer class (layers.layer_class)
    init: str = "kaiming"  # a key of init.INITS: how A and B start
    vera_rank: int = 256  # VeRA: rank of the shared random projections (peft's default)
    base_dtype: str = (
        "fp32"  # how the frozen base is stored (modeling.BASE_DTYPES): loading quantizes it alike
    )
    loftq_iter: int = 1  # LoftQ: alternations of quantization and rank-r fit (peft's default)

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        need(
            self.variant in VARIANTS,
            f"LoRA variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}",
        )
        need(self.init in INITS, f"LoRA init must be one of {', '.join(INITS)}, got {self.init!r}")
        need(self.rank >= 1, f"LoRA rank must be >= 1, got {self.rank}")
        need(
            self.base_dtype in BASE_DTYPES,
            f"base dtype must be one of {', '.join(BASE_DTYPES)}, got {self.base_dtype!r}",
        )
        need(
            self.init != "loftq" or self.base_dtype == "nf4",
            "--lora-init loftq quantizes the base: it needs --base-dtype nf4",
        )
        need(self.loftq_iter >= 1, f"--loftq-iter must be >= 1, got {self.loftq_iter}")
        need(0 <= self.dropout < 1, f"LoRA dropout must be in [0, 1), got {self.dropout}")
        layer_class(self).check(self)

    @property
    def scaling(self) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA (the update's size then stays steady as r grows)."""
        return self.alpha / math.sqrt(self.rank) if self.rslora else self.alpha / self.rank

    def to_json(self, base_model: str) -> dict:
        return {"format": FORMAT, "base_model": base_model, **asdict(self)}

    @classmethod
    def from_json(cls, saved: dict) -> "LoRAConfig":
        """The config of an adapter.json, this format or the first one (written before LoRAConfig existed)."""
        saved = dict(saved)
        version = saved.pop("format", OLD_FORMAT)
        need(
            version in (FORMAT, FORMAT_2, OLD_FORMAT),
            f"adapter format {version!r} is not one this version reads "
            f"({FORMAT}, {FORMAT_2} or {OLD_FORMAT}); update dialsum_raw",
        )
        need(
            isinstance(saved.get("targets"), list),
            f"adapter targets must be a list, got {saved.get('targets')!r}",
        )
        if version == OLD_FORMAT:  # its missing fields keep the defaults it was documented with
            pissa = saved.pop("pissa", None)  # saved as rank 2r; the trained rank and alpha are here
            if pissa:
                saved.update(rank=pissa["rank"], alpha=pissa["alpha"], init="pissa")
            saved["variant"] = "dora" if saved.pop("dora", False) else "lora"
        if version == FORMAT_2:
            saved = {**SINCE_3, **saved}
        saved.pop("base_model", None)
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in saved]
        # a default would change the computation silently (an alpha-64 adapter run at alpha 16)
        need(
            version == OLD_FORMAT or not missing,
            f"adapter field {missing[0] if missing else ''!r} is missing: "
            f"format {version} holds every field ({', '.join(names)})",
        )
        unknown = sorted(set(saved) - set(names))
        need(not unknown, f"adapter field {unknown[0] if unknown else ''!r} is not one of {', '.join(names)}")
        for name, kind in ((f.name, f.type) for f in fields(cls) if f.name in saved):
            what = expected_type(kind, saved[name])
            need(what is None, f"adapter {name} must be {what}, got {saved[name]!r}")
        need(
            all(isinstance(t, str) for t in saved["targets"]),
            f"adapter targets must be strings, got {saved['targets']!r}",
        )
        return cls(**saved)

    def describe(self) -> str:
        """One line for people: every field but the targets."""
        return ", ".join(
            f"{f.name} {getattr(self, f.name):g}"
            if isinstance(getattr(self, f.name), float)
            else f"{f.name} {getattr(self, f.name)}"
            for f in fields(self)
            if f.name != "targets"
        )

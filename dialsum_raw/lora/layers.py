"""One class per structural variant: LoRALinear, LoRAFALinear(LoRALinear), DoRALinear(LoRALinear), VeRALinear.

Each owns its forward, delta_weight() (what it adds to the wrapped weight, in fp32), merge and unmerge, the
tensors it saves, which of them train and how the optimizer treats them, and their form in peft's format.
inject, save, load, export, the optimizer and the inspector only go through these, so a new variant is one
class here and one entry in VARIANTS (docs/lora.md, "Write your own variant", lists what a class provides).
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import UserError, need
from ..quant import NF4Linear, dense_weight, device_of
from .init import INITS, residual_form


def fp32(t: torch.Tensor):
    """Autocast off: under autocast even `a.float() @ b.float()` runs in bf16."""
    return torch.autocast("cuda" if t.is_cuda else "cpu", enabled=False)


class AdapterLinear(nn.Module):
    """What every variant shares: a frozen base Linear, dropout on the adapter's input, merge and unmerge
    through delta_weight(), and the defaults of the contract. `rank` is the rank of the update (inspect
    reports its top `rank` directions)."""
    SUMMARY = ""     # what the variant is, in a few words: --lora-variant's help
    PEFT_NAMES = {}  # saved tensor -> its name in peft's adapter_model.safetensors (to_peft's default)
    FAST = ()        # LoRA+: the tensors that learn at K x lr (B, and what plays its part)
    NO_DECAY = ()    # the tensors AdamW does not decay (magnitudes, scaling vectors, gates)

    def __init__(self, base: nn.Linear, cfg, rank: int, shared=None):
        super().__init__()
        self.base, self.cfg, self.rank, self.shared = base.requires_grad_(False), cfg, rank, shared
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.merged = False

    @classmethod
    def trainable(cls, cfg) -> set:
        """The names of the tensors that train under cfg; inject freezes the layer's other parameters."""
        return set()

    @classmethod
    def check(cls, cfg):
        """Refuse, in one line, a config this variant cannot honour (as peft refuses it), or under which
        nothing would train. A variant with refusals of its own adds them and calls this."""
        need(cls.trainable(cfg), f"--lora-variant {cfg.variant} with --lora-init {cfg.init} trains nothing "
                                 f"(every tensor of the layer is frozen)")

    @staticmethod
    def make_shared(cfg, bases):
        """A module that every layer of one model shares (VeRA's projections): inject builds it once and
        passes it to each layer as `shared`; it saves and loads its own tensors. None: each layer stands
        alone."""
        return None

    @property
    def weight(self):
        """The base weight, for callers that read it (T5's feed-forward checks wo.weight.dtype)."""
        return self.base.weight

    def delta_weight(self) -> torch.Tensor:
        """W_adapted - W of the unmerged layer, in fp32."""
        raise NotImplementedError

    def check_mergeable(self):
        """Merging into a 4-bit base would re-quantize W + ΔW (peft does, 9% off): refused in one line."""
        need(not isinstance(self.base, NF4Linear), "an adapter does not merge into a 4-bit base (that would "
             "re-quantize the update away); evaluate it unmerged, or write a merged bf16/fp32 model with "
             "python -m dialsum_raw.lora merge")

    @torch.no_grad()
    def merge(self):
        """Fold the update into W: inference at base speed."""
        self.check_mergeable()
        if not self.merged:
            w = self.base.weight
            w.copy_((w.float() + self.delta_weight()).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            w = self.base.weight
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
            self.merged = False

    def optimizer_roles(self) -> dict:
        """{parameter: (fast, decay)} for this layer's own tensors, as FAST and NO_DECAY declare them:
        training.make_optimizer reads this, never the names or shapes."""
        return {p: (n in self.FAST, n not in self.NO_DECAY) for n, p in self.named_parameters(recurse=False)}

    @classmethod
    def to_peft(cls, cfg, saved: dict) -> dict:
        """One layer's saved tensors (or the shared module's) under peft's names, for export-peft. The default
        renames them by PEFT_NAMES; a variant whose tensors peft holds in another form transforms them
        here."""
        missing = [k for k in saved if k not in cls.PEFT_NAMES]
        if missing:
            cls.refuse_peft(cfg, missing[0])
        return {cls.PEFT_NAMES[k]: t for k, t in saved.items()}

    @classmethod
    def peft_config(cls, cfg) -> dict:
        """The peft fields of adapter_config.json for this variant (peft_type, r, ...)."""
        cls.refuse_peft(cfg, "config")

    @classmethod
    def refuse_peft(cls, cfg, what):
        """export-peft's one line for what peft has no form of; export_peft calls to_peft and peft_config
        before it writes anything."""
        raise UserError(f"export-peft: peft has no form for the {what} of {cls.__name__} (--lora-variant "
                        f"{cfg.variant}); merge the adapter instead: python -m dialsum_raw.lora merge")

    def extra_repr(self):
        return f"{self.cfg.describe()}, merged={self.merged}"


class LoRALinear(AdapterLinear):
    """y = W x + s B A dropout(x), W frozen (Hu et al., 2021). A (r x in) and B (out x r) start as
    init.INITS[cfg.init] says; s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
    SUMMARY = "plain LoRA"
    PEFT_NAMES = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}
    FAST = ("lora_B",)

    def __init__(self, base: nn.Linear, cfg, start: bool = True, shared=None):
        super().__init__(base, cfg, cfg.rank, shared)
        self.scaling = cfg.scaling
        device = device_of(base)  # trained tensors are fp32 whatever the base's storage
        self.lora_A = nn.Parameter(torch.zeros(cfg.rank, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, cfg.rank, device=device))
        if start or INITS[cfg.init].rebase:  # else load() fills A and B
            with torch.no_grad():
                INITS[cfg.init].start(self)

    @classmethod
    def trainable(cls, cfg):
        return {"lora_A", "lora_B"} - set(INITS[cfg.init].frozen)

    def forward(self, x):
        out = self.base(x)
        if self.merged:
            return out
        return out + self.lora(self.dropout(x)) * self.scaling

    def lora(self, x):
        """B A x, unscaled."""
        return F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)

    def delta_weight(self):
        """s B A in fp32: a bf16 product would lose the small update against W."""
        with fp32(self.lora_A):
            return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def saved(self) -> dict:
        return {"lora_A": self.lora_A.detach(), "lora_B": self.lora_B.detach()}

    @torch.no_grad()
    def load(self, saved: dict):
        """The inverse of saved()."""
        self.lora_A.copy_(saved["lora_A"])
        self.lora_B.copy_(saved["lora_B"])

    @classmethod
    def saved_shapes(cls, cfg, base: nn.Linear) -> dict:
        return {"lora_A": (cfg.rank, base.in_features), "lora_B": (base.out_features, cfg.rank)}

    @classmethod
    def peft_config(cls, cfg) -> dict:
        return {"peft_type": "LORA", "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
                "use_rslora": cfg.rslora, "use_dora": False, "init_lora_weights": INITS[cfg.init].peft}


class LoRAFALinear(LoRALinear):
    """LoRA-FA (Zhang et al., 2023): A stays frozen at its random start; only B trains."""
    SUMMARY = "LoRA-FA, A frozen at its start and only B trained"

    @classmethod
    def trainable(cls, cfg):
        return super().trainable(cfg) - {"lora_A"}


class DoRALinear(LoRALinear):
    """W' = m (W + s B A) / ||W + s B A|| (Liu et al., 2024), the norm per output row, so direction and
    magnitude learn separately. m trains and starts at ||W||, so the layer starts out equal to its base."""
    SUMMARY = "DoRA, a trained per-row magnitude times the normalized W + BA"
    PEFT_NAMES = {**LoRALinear.PEFT_NAMES, "lora_magnitude": "lora_magnitude_vector"}
    FAST = ("lora_B", "lora_magnitude")  # LoRA+ as peft's create_loraplus_optimizer groups a 1-D tensor
    NO_DECAY = ("lora_magnitude",)

    def __init__(self, base: nn.Linear, cfg, start: bool = True, shared=None):
        super().__init__(base, cfg, start)
        self.lora_magnitude = nn.Parameter(self.row_norm(super().delta_weight()))
        self.register_buffer("merged_norm", None, persistent=False)  # ||W + s B A|| while merged, for unmerge

    @classmethod
    def trainable(cls, cfg):
        return super().trainable(cfg) | {"lora_magnitude"}

    @classmethod
    def check(cls, cfg):
        need(cfg.init != "mica", "DoRA does not combine with --lora-init mica (peft refuses the pair)")
        super().check(cfg)

    def row_norm(self, delta):
        """||W + delta|| per output row (DoRA's column norm, in the paper's W x convention), in fp32; W
        dequantized for a 4-bit base."""
        return torch.linalg.norm(dense_weight(self.base).float() + delta, dim=1)

    def forward(self, x):
        out = self.base(x)
        if self.merged:
            return out
        dropped = self.dropout(x)
        lora = self.lora(dropped)
        # W' x = f (W x + s B A x), f = m / ||W + s B A|| with the norm detached (DoRA 4.3). As in peft, with
        # dropout on, the DoRA terms see the dropped-out x: out + (f - 1) W x_d + f s B A x_d. f and these
        # terms
        # stay fp32 under autocast: near 1 bf16 steps by 2^-8, which would swallow a magnitude change under
        # 0.4%.
        f = self.lora_magnitude.float() / self.row_norm(super().delta_weight().detach())
        wx = self.base(dropped) if self.training and isinstance(self.dropout, nn.Dropout) else out
        wx = wx if self.base.bias is None else wx - self.base.bias
        return (out + ((f - 1) * wx + f * lora * self.scaling)).to(out.dtype)

    def delta_weight(self):
        w = dense_weight(self.base).float()
        v = w + super().delta_weight()
        return v * (self.lora_magnitude.float() / v.norm(dim=1))[:, None] - w

    @torch.no_grad()
    def merge(self):
        self.check_mergeable()
        if not self.merged:
            w = self.base.weight
            new = w.float() + super().delta_weight()
            self.merged_norm = new.norm(dim=1)
            new *= (self.lora_magnitude.float() / self.merged_norm)[:, None]
            w.copy_(new.to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            w = self.base.weight
            old = w.float() * (self.merged_norm / self.lora_magnitude.float())[:, None]
            w.copy_((old - super().delta_weight()).to(w.dtype))
            self.merged, self.merged_norm = False, None

    def saved(self):
        return {**super().saved(), "lora_magnitude": self.lora_magnitude.detach()}

    @torch.no_grad()
    def load(self, saved):
        super().load(saved)
        self.lora_magnitude.copy_(saved["lora_magnitude"])

    @classmethod
    def saved_shapes(cls, cfg, base):
        return {**super().saved_shapes(cfg, base), "lora_magnitude": (base.out_features,)}

    @classmethod
    def peft_config(cls, cfg):
        return {**super().peft_config(cfg), "use_dora": True}


class VeRAProjections(nn.Module):
    """VeRA's frozen random A (r x in) and B (out x r), one pair for a whole model, sized for its largest
    layer; each layer uses the top-left slice it needs. Kaiming-uniform (gain sqrt 2) from a generator seeded
    with SEED, in this order, as peft's projection_prng_key draws them, so both start from the same matrices.
    Buffers, not parameters: they never train, and the adapter saves them once."""
    SEED = 0

    def __init__(self, rank, in_features, out_features, device):
        super().__init__()
        g = torch.Generator().manual_seed(self.SEED)
        for name, shape in (("vera_A", (rank, in_features)), ("vera_B", (out_features, rank))):
            bound = math.sqrt(3.0) * (
                math.sqrt(2) / math.sqrt(shape[1])
            )  # peft's _kaiming_init, to the last bit
            t = torch.empty(shape).uniform_(-bound, bound, generator=g)
            self.register_buffer(name, t.to(device), persistent=False)

    def saved(self):
        return {"vera_A": self.vera_A, "vera_B": self.vera_B}

    @torch.no_grad()
    def load(self, saved):
        self.vera_A.copy_(saved["vera_A"])
        self.vera_B.copy_(saved["vera_B"])


class VeRALinear(AdapterLinear):
    """y = W x + Λ_b B Λ_d A dropout(x) (Kopiczko et al., 2024): A and B are frozen random projections shared
    by every layer, and only the vectors λ_d (r, starts at 0.1) and λ_b (out, starts at 0) train, so the layer
    starts out equal to its base. No alpha/r scale; r is cfg.vera_rank."""
    SUMMARY = "VeRA, shared frozen random projections and trained scaling vectors"
    PEFT_NAMES = {"vera_lambda_b": "vera_lambda_b", "vera_lambda_d": "vera_lambda_d", "vera_A": "vera_A",
                  "vera_B": "vera_B"}
    NO_DECAY = ("vera_lambda_b", "vera_lambda_d")  # FAST: none, so LoRA+ is refused (no B trains)
    D_INITIAL = 0.1  # peft's d_initial

    def __init__(self, base: nn.Linear, cfg, start: bool = True, shared: VeRAProjections = None):
        super().__init__(base, cfg, cfg.vera_rank, shared)
        device = device_of(base)
        self.vera_lambda_b = nn.Parameter(torch.zeros(base.out_features, device=device))
        self.vera_lambda_d = nn.Parameter(torch.full((cfg.vera_rank,), self.D_INITIAL, device=device))

    @classmethod
    def trainable(cls, cfg):
        return {"vera_lambda_b", "vera_lambda_d"}

    @classmethod
    def check(cls, cfg):
        need(cfg.init == "kaiming", f"VeRA takes no --lora-init (its A and B are shared random projections), "
                                    f"got {cfg.init!r}")
        need(not cfg.rslora, "VeRA has no alpha/r scale, so --rslora does not apply")
        need(cfg.vera_rank >= 1, f"--vera-rank must be >= 1, got {cfg.vera_rank}")
        super().check(cfg)

    @staticmethod
    def make_shared(cfg, bases):
        return VeRAProjections(
            cfg.vera_rank,
            max(b.in_features for b in bases),
            max(b.out_features for b in bases),
            device_of(bases[0]),
        )

    def _a_b(self):
        """This layer's slices of the shared A and B."""
        p = self.shared
        return p.vera_A[:, :self.base.in_features], p.vera_B[:self.base.out_features]

    def forward(self, x):
        out = self.base(x)
        if self.merged:
            return out
        a, b = self._a_b()
        x = self.dropout(x).to(self.vera_lambda_d.dtype)
        return out + self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(x, a), b)

    def delta_weight(self):
        """Λ_b B Λ_d A in fp32."""
        a, b = self._a_b()
        with fp32(a):
            return (self.vera_lambda_b.float()[:, None] * b.float()) @ (
                self.vera_lambda_d.float()[:, None] * a.float()
            )

    def saved(self):
        return {"vera_lambda_b": self.vera_lambda_b.detach(), "vera_lambda_d": self.vera_lambda_d.detach()}

    @torch.no_grad()
    def load(self, saved):
        self.vera_lambda_b.copy_(saved["vera_lambda_b"])
        self.vera_lambda_d.copy_(saved["vera_lambda_d"])

    @staticmethod
    def saved_shapes(cfg, base):
        return {"vera_lambda_b": (base.out_features,), "vera_lambda_d": (cfg.vera_rank,)}

    @staticmethod
    def peft_config(cfg):
        return {
            "peft_type": "VERA",
            "r": cfg.vera_rank,
            "vera_dropout": cfg.dropout,
            "d_initial": VeRALinear.D_INITIAL,
            "projection_prng_key": VeRAProjections.SEED,
            "save_projection": True,
            "init_weights": True,
        }


VARIANTS = {"lora": LoRALinear, "dora": DoRALinear, "vera": VeRALinear, "lora-fa": LoRAFALinear}


def layer_class(cfg):
    """The class that wraps each target layer under cfg: its variant's, in its residual form after an init
    that moves part of W into the adapter (PiSSA, OLoRA; init.Residual)."""
    cls = VARIANTS[cfg.variant]
    return residual_form(cls) if INITS[cfg.init].residual else cls

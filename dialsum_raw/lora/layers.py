"""One class per structural variant: LoRALinear, DoRALinear(LoRALinear), VeRALinear.

Each owns its forward, delta_weight() (what it adds to the wrapped weight, in fp32), merge and unmerge, the
tensors it saves and their names in peft's format. inject, save, load, export and the inspector only go
through these, so a new variant is one class here and one entry in VARIANTS.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

from .config import need
from .init import INITS


def fp32(t: torch.Tensor):
    """Autocast off: under autocast even `a.float() @ b.float()` runs in bf16."""
    return torch.autocast("cuda" if t.is_cuda else "cpu", enabled=False)


class AdapterLinear(nn.Module):
    """What every variant shares: a frozen base Linear, dropout on the adapter's input, merge and unmerge
    through delta_weight(). `rank` is the rank of the update (inspect reports its top `rank` directions)."""
    PEFT_NAMES = {}  # saved tensor -> its name in peft's adapter_model.safetensors

    def __init__(self, base: nn.Linear, cfg, rank: int, shared=None):
        super().__init__()
        self.base, self.cfg, self.rank, self.shared = base.requires_grad_(False), cfg, rank, shared
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.merged = False

    @staticmethod
    def check(cfg):
        """Refuse, in one line, a config this variant cannot honour (as peft refuses it)."""

    @staticmethod
    def make_shared(cfg, bases):
        """A module that every layer of one model shares (VeRA's projections): inject builds it once and passes
        it to each layer as `shared`; it saves and loads its own tensors. None: each layer stands alone."""
        return None

    @property
    def weight(self):
        """The base weight, for callers that read it (T5's feed-forward checks wo.weight.dtype)."""
        return self.base.weight

    def delta_weight(self) -> torch.Tensor:
        """W_adapted - W of the unmerged layer, in fp32."""
        raise NotImplementedError

    @torch.no_grad()
    def merge(self):
        """Fold the update into W: inference at base speed."""
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

    def extra_repr(self):
        return f"{self.cfg.describe()}, merged={self.merged}"


class LoRALinear(AdapterLinear):
    """y = W x + s B A dropout(x), W frozen (Hu et al., 2021). A (r x in) and B (out x r) start as
    init.INITS[cfg.init] says; s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
    PEFT_NAMES = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}

    def __init__(self, base: nn.Linear, cfg, start: bool = True, shared=None):
        super().__init__(base, cfg, cfg.rank, shared)
        self.scaling = cfg.scaling
        w, init = base.weight, INITS[cfg.init]
        self.lora_A = nn.Parameter(torch.zeros(cfg.rank, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, cfg.rank, dtype=w.dtype, device=w.device))
        if start:  # else load() fills A and B
            with torch.no_grad():
                init.start(self)
        for name in init.frozen:
            getattr(self, name).requires_grad_(False)

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

    @torch.no_grad()
    def keep_residual(self, a0, b0):
        """Start the adapter at (A0, B0) and W at W - s B0 A0 (PiSSA, OLoRA), so the output is unchanged. A0 and
        B0 are kept to save the adapter for the original W: W_res + s B A = W + s (B A - B0 A0)."""
        w = self.base.weight
        a0, b0 = a0.to(w.device, torch.float32), b0.to(w.device, torch.float32)
        w.copy_((w.float() - self.scaling * b0 @ a0).to(w.dtype))
        self.register_buffer("lora_A0", a0.clone(), persistent=False)
        self.register_buffer("lora_B0", b0.clone(), persistent=False)
        self.lora_A.copy_(a0)
        self.lora_B.copy_(b0)

    def saved(self) -> dict:
        """A and B; after a residual init in the rank-2r form for the original W, A' = [A; A0], B' = [B, -B0], as
        peft's save_pretrained(path_initial_model_for_weight_conversion=...) writes it."""
        a, b = self.lora_A.detach(), self.lora_B.detach()
        if INITS[self.cfg.init].residual:
            a, b = torch.cat([a, self.lora_A0.to(a.dtype)]), torch.cat([b, -self.lora_B0.to(b.dtype)], dim=1)
        return {"lora_A": a, "lora_B": b}

    @torch.no_grad()
    def load(self, saved: dict):
        """The inverse of saved(): a residual adapter becomes its trained rank-r form on W - s B0 A0 again."""
        r, a, b = self.cfg.rank, saved["lora_A"], saved["lora_B"]
        if INITS[self.cfg.init].residual:
            self.keep_residual(a[r:], -b[:, r:])
        self.lora_A.copy_(a[:r])
        self.lora_B.copy_(b[:, :r])

    @staticmethod
    def saved_rank_alpha(cfg):
        """Rank and alpha of the saved tensors: 2r after a residual init, alpha x2 (x sqrt 2 with rsLoRA) so the
        scale stays s."""
        if not INITS[cfg.init].residual:
            return cfg.rank, cfg.alpha
        return 2 * cfg.rank, cfg.alpha * (2 ** 0.5 if cfg.rslora else 2)

    @classmethod
    def saved_shapes(cls, cfg, base: nn.Linear) -> dict:
        r = cls.saved_rank_alpha(cfg)[0]
        return {"lora_A": (r, base.in_features), "lora_B": (base.out_features, r)}

    @classmethod
    def peft_config(cls, cfg) -> dict:
        r, alpha = cls.saved_rank_alpha(cfg)
        return {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "lora_dropout": cfg.dropout,
                "use_rslora": cfg.rslora, "use_dora": False, "init_lora_weights": INITS[cfg.init].peft}


class DoRALinear(LoRALinear):
    """W' = m (W + s B A) / ||W + s B A|| (Liu et al., 2024), the norm per output row, so direction and magnitude
    learn separately. m trains and starts at ||W||, so the layer starts out equal to its base."""
    PEFT_NAMES = {**LoRALinear.PEFT_NAMES, "lora_magnitude": "lora_magnitude_vector"}

    def __init__(self, base: nn.Linear, cfg, start: bool = True, shared=None):
        super().__init__(base, cfg, start)
        self.lora_magnitude = nn.Parameter(self.row_norm(super().delta_weight()).to(base.weight.dtype))
        self.register_buffer("merged_norm", None, persistent=False)  # ||W + s B A|| while merged, for unmerge

    @staticmethod
    def check(cfg):
        need(cfg.init != "mica", "DoRA does not combine with --lora-init mica (peft refuses the pair)")

    def row_norm(self, delta):
        """||W + delta|| per output row (DoRA's column norm, in the paper's W x convention), in fp32."""
        return torch.linalg.norm(self.base.weight.float() + delta, dim=1)

    def forward(self, x):
        out = self.base(x)
        if self.merged:
            return out
        dropped = self.dropout(x)
        lora = self.lora(dropped)
        # W' x = f (W x + s B A x), f = m / ||W + s B A|| with the norm detached (DoRA 4.3). As in peft, with
        # dropout on, the DoRA terms see the dropped-out x: out + (f - 1) W x_d + f s B A x_d. f and these terms
        # stay fp32 under autocast: near 1 bf16 steps by 2^-8, which would swallow a magnitude change under 0.4%.
        f = self.lora_magnitude.float() / self.row_norm(super().delta_weight().detach())
        if self.training and isinstance(self.dropout, nn.Dropout):
            wx = F.linear(dropped, self.base.weight)
        else:
            wx = out if self.base.bias is None else out - self.base.bias
        return (out + ((f - 1) * wx + f * lora * self.scaling)).to(out.dtype)

    def delta_weight(self):
        w = self.base.weight.float()
        v = w + super().delta_weight()
        return v * (self.lora_magnitude.float() / v.norm(dim=1))[:, None] - w

    @torch.no_grad()
    def merge(self):
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
    """VeRA's frozen random A (r x in) and B (out x r), one pair for a whole model, sized for its largest layer;
    each layer uses the top-left slice it needs. Kaiming-uniform (gain sqrt 2) from a generator seeded with
    SEED, in this order, as peft's projection_prng_key draws them, so both start from the same matrices.
    Buffers, not parameters: they never train, and the adapter saves them once."""
    SEED = 0

    def __init__(self, rank, in_features, out_features, like: torch.Tensor):
        super().__init__()
        g = torch.Generator().manual_seed(self.SEED)
        for name, shape in (("vera_A", (rank, in_features)), ("vera_B", (out_features, rank))):
            bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))  # peft's _kaiming_init, to the last bit
            t = torch.empty(shape).uniform_(-bound, bound, generator=g)
            self.register_buffer(name, t.to(like.device, like.dtype), persistent=False)

    def saved(self):
        return {"vera_A": self.vera_A, "vera_B": self.vera_B}

    @torch.no_grad()
    def load(self, saved):
        self.vera_A.copy_(saved["vera_A"])
        self.vera_B.copy_(saved["vera_B"])


class VeRALinear(AdapterLinear):
    """y = W x + Λ_b B Λ_d A dropout(x) (Kopiczko et al., 2024): A and B are frozen random projections shared by
    every layer, and only the vectors λ_d (r, starts at 0.1) and λ_b (out, starts at 0) train, so the layer
    starts out equal to its base. No alpha/r scale; r is cfg.vera_rank."""
    PEFT_NAMES = {"vera_lambda_b": "vera_lambda_b", "vera_lambda_d": "vera_lambda_d", "vera_A": "vera_A",
                  "vera_B": "vera_B"}
    D_INITIAL = 0.1  # peft's d_initial

    def __init__(self, base: nn.Linear, cfg, start: bool = True, shared: VeRAProjections = None):
        super().__init__(base, cfg, cfg.vera_rank, shared)
        w = base.weight
        self.vera_lambda_b = nn.Parameter(torch.zeros(base.out_features, dtype=w.dtype, device=w.device))
        self.vera_lambda_d = nn.Parameter(torch.full((cfg.vera_rank,), self.D_INITIAL, dtype=w.dtype,
                                                     device=w.device))

    @staticmethod
    def check(cfg):
        need(cfg.init == "kaiming", f"VeRA takes no --lora-init (its A and B are shared random projections), "
                                    f"got {cfg.init!r}")
        need(not cfg.rslora, "VeRA has no alpha/r scale, so --rslora does not apply")
        need(cfg.vera_rank >= 1, f"--vera-rank must be >= 1, got {cfg.vera_rank}")

    @staticmethod
    def make_shared(cfg, bases):
        return VeRAProjections(cfg.vera_rank, max(b.in_features for b in bases), max(b.out_features for b in bases),
                               like=bases[0].weight)

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
            return (self.vera_lambda_b.float()[:, None] * b.float()) @ (self.vera_lambda_d.float()[:, None] * a.float())

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
        return {"peft_type": "VERA", "r": cfg.vera_rank, "vera_dropout": cfg.dropout, "d_initial": VeRALinear.D_INITIAL,
                "projection_prng_key": VeRAProjections.SEED, "save_projection": True, "init_weights": True}


VARIANTS = {"lora": LoRALinear, "dora": DoRALinear, "vera": VeRALinear}

"""LoRA from scratch: y = W x + (B A dropout(x)) * scale, with W frozen.

A (r x in) starts Kaiming-uniform (or Gaussian) and B (out x r) at zero, so an injected model starts
out exactly equal to its base. scale = alpha / r (or alpha / sqrt(r) with rsLoRA, which keeps the
update's size steady as r grows). merge() folds the update into W for inference at base speed.

Variants, one flag each, recorded in adapter.json and matched against peft in tests/test_lora.py:
- DoRA (dora=True): W' = m * (W + s B A) / ||W + s B A||, the norm per output row, so direction and
  magnitude learn separately; m is trained and starts at ||W||.
- PiSSA (init="pissa"): A and B start as W's top-r singular directions and W keeps the residual, so
  training moves the principal part of W instead of a zero update.
- LoRA+ is an optimizer setting (B learns K x faster): training.make_optimizer.

    python -m dialsum_raw.lora merge --base MODEL --adapter DIR --out OUT
    python -m dialsum_raw.lora export-peft --adapter DIR --out OUT
    python -m dialsum_raw.lora inspect ADAPTER --base MODEL [--compare ADAPTER2] [--json] [--plot DIR]
"""

import argparse
import json
import math
import os

import torch
from torch import nn
from torch.nn import functional as F

from .errors import UserError, run_cli

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"
INITS = ("kaiming", "gaussian", "pissa")


def scaling(alpha, rank, rslora=False):
    """alpha / r, or alpha / sqrt(r) with rsLoRA (the update's size then stays steady as r grows)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 dora: bool = False, init: str = "kaiming"):
        super().__init__()
        if rank < 1:
            raise UserError(f"LoRA rank must be >= 1, got {rank}")
        if init not in INITS:
            raise UserError(f"LoRA init must be one of {', '.join(INITS)}, got {init!r}")
        self.base = base.requires_grad_(False)
        self.rank, self.alpha, self.rslora, self.dora, self.init = rank, alpha, rslora, dora, init
        self.scaling = scaling(alpha, rank, rslora)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device))
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as in loralib and peft
        elif init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / rank)  # peft's "gaussian": std 1/r
        else:
            self._pissa_init()
        if dora:  # starts at ||W + s B A|| = ||W||, so the layer starts out equal to its base
            self.lora_magnitude = nn.Parameter(self._row_norm(self.delta_weight()).to(w.dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @property
    def weight(self):
        """The base weight, for callers that read it (T5's feed-forward checks wo.weight.dtype)."""
        return self.base.weight

    @torch.no_grad()
    def _pissa_init(self):
        """W = U S V^T: A = sqrt(S_r / s) V_r^T and B = U_r sqrt(S_r / s), so s B A is W's best rank-r part
        (as peft's pissa_init); W keeps the residual, so the layer's output is unchanged."""
        u, s, vh = torch.linalg.svd(self.base.weight.float(), full_matrices=False)
        root = (s[:self.rank] / self.scaling).sqrt()
        a, b = torch.diag(root) @ vh[:self.rank], u[:, :self.rank] @ torch.diag(root)
        self.keep_residual(a, b)
        self.lora_A.copy_(a)
        self.lora_B.copy_(b)

    @torch.no_grad()
    def keep_residual(self, a0, b0):
        """PiSSA: W becomes W - s B0 A0 while the adapter starts at (A0, B0). (A0, B0) are kept, so the adapter
        can be saved against the original W: W_res + s B A = W + s (B A - B0 A0)."""
        w = self.base.weight
        a0, b0 = a0.to(w.device, torch.float32), b0.to(w.device, torch.float32)
        w.copy_((w.float() - self.scaling * b0 @ a0).to(w.dtype))
        self.register_buffer("lora_A0", a0.clone(), persistent=False)
        self.register_buffer("lora_B0", b0.clone(), persistent=False)
        self.init = "pissa"

    def delta_weight(self) -> torch.Tensor:
        """B A scale in fp32: a bf16 product would lose the small update against W."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def _row_norm(self, delta):
        """||W + delta|| per output row (DoRA's column norm, in the paper's W x convention), in fp32."""
        return torch.linalg.norm(self.base.weight.float() + delta, dim=1)

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            w = self.base.weight
            new = w.float() + self.delta_weight()
            if self.dora:
                self.merged_norm = new.norm(dim=1)  # unmerge needs the norm of the unmerged W + s B A
                new *= (self.lora_magnitude.float() / self.merged_norm)[:, None]
            w.copy_(new.to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            w = self.base.weight
            old = w.float()
            if self.dora:
                old *= (self.merged_norm / self.lora_magnitude.float())[:, None]
            w.copy_((old - self.delta_weight()).to(w.dtype))
            self.merged = False

    def forward(self, x):
        out = self.base(x)
        if self.merged:
            return out
        a, b = self.lora_A, self.lora_B
        dropped = self.dropout(x)
        lora = F.linear(F.linear(dropped.to(a.dtype), a), b)
        if not self.dora:
            return out + lora * self.scaling
        # W' x = f (W x + s B A x), f = m / ||W + s B A|| with the norm detached (DoRA 4.3). As in peft, with
        # dropout on, the DoRA terms see the dropped-out x: out + (f - 1) W x_d + f s B A x_d.
        f = (self.lora_magnitude / self._row_norm(self.delta_weight().detach())).to(out.dtype)
        if self.training and isinstance(self.dropout, nn.Dropout):
            wx = F.linear(dropped, self.base.weight)
        else:
            wx = out if self.base.bias is None else out - self.base.bias
        return out + ((f - 1) * wx + f * lora * self.scaling)

    def extra_repr(self):
        return (f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}, dora={self.dora}, "
                f"init={self.init}, merged={self.merged}")


def _target_layers(model, targets):
    """Names of the Linear layers whose last name part is a target; every target must match one."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets]
    missing = [t for t in targets if not any(n.rsplit(".", 1)[-1] == t for n in names)]
    if missing:
        raise UserError(f"LoRA target {missing[0]!r} matches no Linear layer of this model "
                        f"(T5 has q, k, v, o in attention and wi_0, wi_1 (or wi), wo in its feed-forward)")
    return names


def inject(model, targets=("q", "v"), rank=8, alpha=16.0, dropout=0.0, rslora=False, dora=False, init="kaiming"):
    """Freeze the model and wrap each target Linear (encoder self-, decoder self- and cross-attention
    for q/k/v/o) in a LoRALinear. Returns the wrapped layer names."""
    model.requires_grad_(False)
    names = _target_layers(model, tuple(targets))
    for name in names:
        parent, child = name.rsplit(".", 1)
        holder = model.get_submodule(parent)
        setattr(holder, child, LoRALinear(getattr(holder, child), rank, alpha, dropout, rslora, dora, init))
    return names


def lora_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def merge(model):
    for _, m in lora_layers(model):
        m.merge()


def unmerge(model):
    for _, m in lora_layers(model):
        m.unmerge()


def unload(model):
    """Merge and put the plain Linear layers back: the result saves as a standard HF model."""
    for name, m in lora_layers(model):
        m.merge()
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, m.base)
    return model


def adapter_state_dict(model) -> dict:
    """The LoRA tensors, '<layer>.lora_A', '<layer>.lora_B' (+ '<layer>.lora_magnitude' for DoRA), in the form
    that applies to the original base. PiSSA layers are converted as peft's save_pretrained(
    path_initial_model_for_weight_conversion=...) does: rank 2r, A' = [A; A0], B' = [B, -B0]."""
    out = {}
    for name, m in lora_layers(model):
        a, b = m.lora_A.detach(), m.lora_B.detach()
        if m.init == "pissa":
            a, b = torch.cat([a, m.lora_A0.to(a.dtype)]), torch.cat([b, -m.lora_B0.to(b.dtype)], dim=1)
        out[f"{name}.lora_A"], out[f"{name}.lora_B"] = a, b
        if m.dora:
            out[f"{name}.lora_magnitude"] = m.lora_magnitude.detach()
    return out


def adapter_config(model, base_model: str) -> dict:
    layers = lora_layers(model)
    if not layers:
        raise UserError("the model has no LoRA layers to save")
    m = layers[0][1]
    cfg = {"format": "dialsum_raw-lora/1", "rank": m.rank, "alpha": m.alpha,
           "dropout": m.dropout.p if isinstance(m.dropout, nn.Dropout) else 0.0,
           "targets": sorted({n.rsplit(".", 1)[-1] for n, _ in layers}),
           "rslora": m.rslora, "dora": m.dora, "init": m.init, "base_model": base_model}
    if m.init == "pissa":  # rank and alpha of the saved 2r form; its scale equals the trained one
        cfg.update(rank=2 * m.rank, alpha=m.alpha * (2 ** 0.5 if m.rslora else 2), pissa={
            "rank": m.rank, "alpha": m.alpha,
            "conversion": "saved as a plain LoRA on the original base: A' = [A; A0], B' = [B, -B0], rank 2r, "
                          "alpha x2 (x sqrt 2 with rsLoRA), as peft's path_initial_model_for_weight_conversion; "
                          "loading rebuilds the trained rank-r form on the residual W - s B0 A0"})
    return cfg


def save_adapter(model, directory, base_model: str):
    from safetensors.torch import save_file
    os.makedirs(directory, exist_ok=True)
    tensors = {k: v.float().contiguous() for k, v in adapter_state_dict(model).items()}
    save_file(tensors, os.path.join(directory, ADAPTER_WEIGHTS))
    with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
        json.dump(adapter_config(model, base_model), f, indent=2)


def read_adapter(directory):
    """(config, tensors) of an adapter folder; a missing, truncated or corrupted file is a UserError."""
    from safetensors.torch import load_file
    cfg_path, w_path = os.path.join(directory, ADAPTER_CONFIG), os.path.join(directory, ADAPTER_WEIGHTS)
    if not os.path.isfile(cfg_path) or not os.path.isfile(w_path):
        raise UserError(f"{directory} is not an adapter folder (expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
        for key in ("rank", "alpha", "targets"):
            cfg[key]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{cfg_path}: unreadable adapter config ({type(e).__name__}: {e})")
    try:
        tensors = load_file(w_path)
    except Exception as e:
        raise UserError(f"{w_path}: truncated or corrupted adapter weights ({e})")
    return cfg, tensors


def check_adapter(model, directory):
    """(config, tensors) of an adapter, after checking it fits `model` exactly; the model is untouched."""
    cfg, tensors = read_adapter(directory)
    try:
        names = _target_layers(model, tuple(cfg["targets"]))
    except UserError as e:
        raise UserError(f"adapter {directory} does not fit this base model: {e}")
    expected = {}
    for n in names:
        base = model.get_submodule(n)
        base = base.base if isinstance(base, LoRALinear) else base
        expected[f"{n}.lora_A"] = (cfg["rank"], base.in_features)
        expected[f"{n}.lora_B"] = (base.out_features, cfg["rank"])
        if cfg.get("dora"):
            expected[f"{n}.lora_magnitude"] = (base.out_features,)
    missing, extra = expected.keys() - tensors.keys(), tensors.keys() - expected.keys()
    if missing or extra:
        which = f"base has layer {sorted(missing)[0]} that the adapter lacks" if missing else \
            f"adapter has {sorted(extra)[0]} that the base lacks"
        raise UserError(f"adapter {directory} does not fit this base model ({which}; "
                        f"adapter base: {cfg.get('base_model', '?')})")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise UserError(f"adapter {directory} does not fit this base model: {key} has shape "
                            f"{tuple(tensors[key].shape)}, the base needs {shape} "
                            f"(adapter base: {cfg.get('base_model', '?')})")
    return cfg, tensors


def load_adapter(model, directory):
    """Inject LoRA as the adapter's config says and load its tensors; the base must fit exactly.
    The result continues training exactly where the saved run stopped (resume calls this)."""
    return apply_adapter(model, *check_adapter(model, directory))


def apply_adapter(model, cfg, tensors):
    """Inject and fill LoRA layers from an adapter that check_adapter has accepted for this model.
    A PiSSA adapter (rank-2r form) becomes its trained rank-r form again, on the residual base."""
    pissa = cfg.get("pissa")
    r, alpha = (pissa["rank"], pissa["alpha"]) if pissa else (cfg["rank"], cfg["alpha"])
    inject(model, cfg["targets"], r, alpha, cfg.get("dropout", 0.0), cfg.get("rslora", False), cfg.get("dora", False))
    with torch.no_grad():
        for name, m in lora_layers(model):
            a, b = tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"]
            if pissa:
                m.keep_residual(a[r:], -b[:, r:])
            m.lora_A.copy_(a[:r])
            m.lora_B.copy_(b[:, :r])
            if m.dora:
                m.lora_magnitude.copy_(tensors[f"{name}.lora_magnitude"])
    return cfg


def export_peft(directory, out):
    """Write peft's adapter_config.json + adapter_model.safetensors (peft's key names)."""
    from safetensors.torch import save_file
    cfg, tensors = read_adapter(directory)
    os.makedirs(out, exist_ok=True)
    peft_names = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude": "lora_magnitude_vector"}
    peft_tensors = {f"base_model.model.{k.rsplit('.', 1)[0]}.{peft_names[k.rsplit('.', 1)[1]]}": v.contiguous()
                    for k, v in tensors.items()}
    save_file(peft_tensors, os.path.join(out, "adapter_model.safetensors"))
    # a PiSSA adapter is already in its rank-2r form, which peft loads as plain LoRA (init_lora_weights=True)
    peft_cfg = {"peft_type": "LORA", "task_type": "SEQ_2_SEQ_LM", "r": cfg["rank"], "lora_alpha": cfg["alpha"],
                "lora_dropout": cfg.get("dropout", 0.0), "target_modules": cfg["targets"],
                "use_rslora": cfg.get("rslora", False), "use_dora": cfg.get("dora", False), "bias": "none",
                "fan_in_fan_out": False, "base_model_name_or_path": cfg.get("base_model"), "inference_mode": True,
                "modules_to_save": None, "init_lora_weights": True}
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(peft_cfg, f, indent=2)


def merge_to_model(base, adapter, out):
    """Base + adapter -> a standard HF model folder (weights merged, tokenizer copied)."""
    from .modeling import load_model, load_tokenizer
    model = load_model(base)
    load_adapter(model, adapter)
    unload(model).save_pretrained(out)
    load_tokenizer(base).save_pretrained(out)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m dialsum_raw.lora", description="LoRA adapter tools.")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="fold an adapter into its base and save a standard model folder")
    m.add_argument("--base", required=True, help="hub id or folder of the base model")
    m.add_argument("--adapter", required=True, help="adapter folder written by train.py")
    m.add_argument("--out", required=True, help="output model folder")
    e = sub.add_parser("export-peft", help="write the adapter in peft's format")
    e.add_argument("--adapter", required=True)
    e.add_argument("--out", required=True)
    from . import lora_inspect  # analysis lives in its own module; it imports this one
    lora_inspect.add_arguments(sub.add_parser("inspect", help=lora_inspect.HELP, description=lora_inspect.HELP))
    a = p.parse_args(argv)
    if a.command == "inspect":
        return lora_inspect.run(a)
    if a.command == "merge":
        merge_to_model(a.base, a.adapter, a.out)
    else:
        export_peft(a.adapter, a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    run_cli(main)

"""LoRA from scratch: y = W x + (B A dropout(x)) * scale, with W frozen.

A (r x in) starts Kaiming-uniform and B (out x r) at zero, so an injected model starts out
exactly equal to its base. scale = alpha / r (or alpha / sqrt(r) with rsLoRA, which keeps the
update's size steady as r grows). merge() folds B A scale into W for inference at base speed.

    python -m dialsum_raw.lora merge --base MODEL --adapter DIR --out OUT
    python -m dialsum_raw.lora export-peft --adapter DIR --out OUT
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


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        if rank < 1:
            raise UserError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base.requires_grad_(False)
        self.rank, self.alpha, self.rslora = rank, alpha, rslora
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as in loralib and peft
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @property
    def weight(self):
        """The base weight, for callers that read it (T5's feed-forward checks wo.weight.dtype)."""
        return self.base.weight

    def delta_weight(self) -> torch.Tensor:
        """B A scale in fp32: a bf16 product would lose the small update against W."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    @torch.no_grad()
    def merge(self):
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

    def forward(self, x):
        out = self.base(x)
        if self.merged:
            return out
        a, b = self.lora_A, self.lora_B
        return out + F.linear(F.linear(self.dropout(x).to(a.dtype), a), b) * self.scaling

    def extra_repr(self):
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


def _target_layers(model, targets):
    """Names of the Linear layers whose last name part is a target; every target must match one."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets]
    missing = [t for t in targets if not any(n.rsplit(".", 1)[-1] == t for n in names)]
    if missing:
        raise UserError(f"LoRA target {missing[0]!r} matches no Linear layer of this model "
                        f"(T5 has q, k, v, o in attention and wi_0, wi_1 (or wi), wo in its feed-forward)")
    return names


def inject(model, targets=("q", "v"), rank=8, alpha=16.0, dropout=0.0, rslora=False):
    """Freeze the model and wrap each target Linear (encoder self-, decoder self- and cross-attention
    for q/k/v/o) in a LoRALinear. Returns the wrapped layer names."""
    model.requires_grad_(False)
    names = _target_layers(model, tuple(targets))
    for name in names:
        parent, child = name.rsplit(".", 1)
        holder = model.get_submodule(parent)
        setattr(holder, child, LoRALinear(getattr(holder, child), rank, alpha, dropout, rslora))
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
    """Only the LoRA tensors: '<layer>.lora_A' and '<layer>.lora_B'."""
    out = {}
    for name, m in lora_layers(model):
        out[f"{name}.lora_A"] = m.lora_A.detach()
        out[f"{name}.lora_B"] = m.lora_B.detach()
    return out


def adapter_config(model, base_model: str) -> dict:
    layers = lora_layers(model)
    if not layers:
        raise UserError("the model has no LoRA layers to save")
    m = layers[0][1]
    return {"format": "dialsum_raw-lora/1", "rank": m.rank, "alpha": m.alpha,
            "dropout": m.dropout.p if isinstance(m.dropout, nn.Dropout) else 0.0,
            "targets": sorted({n.rsplit(".", 1)[-1] for n, _ in layers}),
            "rslora": m.rslora, "base_model": base_model}


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
    """Inject LoRA as the adapter's config says and load its tensors; the base must fit exactly."""
    return apply_adapter(model, *check_adapter(model, directory))


def apply_adapter(model, cfg, tensors):
    """Inject and fill LoRA layers from an adapter that check_adapter has accepted for this model."""
    inject(model, cfg["targets"], cfg["rank"], cfg["alpha"], cfg.get("dropout", 0.0), cfg.get("rslora", False))
    layers = dict(lora_layers(model))
    with torch.no_grad():
        for key, value in tensors.items():
            layer, part = key.rsplit(".", 1)
            getattr(layers[layer], part).copy_(value)
    return cfg


def export_peft(directory, out):
    """Write peft's adapter_config.json + adapter_model.safetensors (peft's key names)."""
    from safetensors.torch import save_file
    cfg, tensors = read_adapter(directory)
    os.makedirs(out, exist_ok=True)
    peft_tensors = {f"base_model.model.{k.rsplit('.', 1)[0]}.{k.rsplit('.', 1)[1]}.weight": v.contiguous()
                    for k, v in tensors.items()}
    save_file(peft_tensors, os.path.join(out, "adapter_model.safetensors"))
    peft_cfg = {"peft_type": "LORA", "task_type": "SEQ_2_SEQ_LM", "r": cfg["rank"], "lora_alpha": cfg["alpha"],
                "lora_dropout": cfg.get("dropout", 0.0), "target_modules": cfg["targets"],
                "use_rslora": cfg.get("rslora", False), "bias": "none", "fan_in_fan_out": False,
                "base_model_name_or_path": cfg.get("base_model"), "inference_mode": True,
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
    a = p.parse_args(argv)
    if a.command == "merge":
        merge_to_model(a.base, a.adapter, a.out)
    else:
        export_peft(a.adapter, a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    run_cli(main)

"""An adapter on a model: inject, merge, and the adapter folder (adapter.json + adapter.safetensors).

Everything here goes through LoRAConfig and the layer class its variant names; nothing is per variant.
"""

import json
import os
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import UserError
from ..quant import NF4Linear, set_weight, stored_weight
from .config import LoRAConfig
from .init import INITS
from .layers import AdapterLinear, layer_class

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"


def target_layers(model, targets):
    """Names of the Linear layers whose last name part is a target; every target must match one."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, NF4Linear))
             and n.rsplit(".", 1)[-1] in targets]
    missing = [t for t in targets if not any(n.rsplit(".", 1)[-1] == t for n in names)]
    if missing:
        raise UserError(f"LoRA target {missing[0]!r} matches no Linear layer of this model "
                        f"(T5 has q, k, v, o in attention and wi_0, wi_1 (or wi), wo in its feed-forward)")
    return names


def inject(model, cfg: LoRAConfig, start: bool = True):
    """Freeze the model and wrap each target Linear (encoder self-, decoder self- and cross-attention for
    q/k/v/o) in cfg's variant, of which only the tensors its trainable(cfg) names train. start=False leaves
    the adapter tensors for load() (no SVD, no random draw). Returns the wrapped layer names."""
    model.requires_grad_(False)
    names = target_layers(model, cfg.targets)
    if start and INITS[cfg.init].from_w:  # checked on every target before any layer is touched
        for name in names:
            shape = model.get_submodule(name).weight.shape
            if cfg.rank > min(shape):
                raise UserError(
                    f"--lora-init {cfg.init} cuts A and B from W: --lora-rank {cfg.rank} is more than "
                    f"min(in, out) = {min(shape)} of layer {name} ({shape[1]} in, {shape[0]} out)"
                )
    layer = layer_class(cfg)
    shared, trainable = layer.make_shared(cfg, [model.get_submodule(n) for n in names]), layer.trainable(cfg)
    for name in names:
        parent, child = name.rsplit(".", 1)
        holder = model.get_submodule(parent)
        wrapped = layer(getattr(holder, child), cfg, start, shared)
        for key, p in wrapped.named_parameters(recurse=False):
            p.requires_grad_(key in trainable)
        setattr(holder, child, wrapped)
    return names


def lora_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLinear)]


def merge(model):
    for _, m in lora_layers(model):
        m.merge()


def merge_for_inference(model):
    """Merge where that is exact up to fp32 rounding, for inference at base speed: onto fp32 bases. A bf16
    base would round the update to bf16 and an nf4 base re-quantize it, so those layers stay unmerged (same
    outputs as in training, at the unmerged layer's cost)."""
    for _, m in lora_layers(model):
        if isinstance(m.base, nn.Linear) and m.base.weight.dtype == torch.float32:
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
    """'<layer>.<tensor>' for every tensor each layer saves, in the form that applies to the original base,
    and the shared module's tensors (VeRA's projections) once, under their own names."""
    layers = lora_layers(model)
    shared = layers[0][1].shared if layers else None
    return {**(shared.saved() if shared is not None else {}),
            **{f"{name}.{key}": t for name, m in layers for key, t in m.saved().items()}}


def save_adapter(model, directory, base_model: str):
    """adapter.json (the LoRAConfig, the format and the base) and adapter.safetensors (fp32)."""
    from safetensors.torch import save_file
    layers = lora_layers(model)
    if not layers:
        raise UserError("the model has no LoRA layers to save")
    cfg = layers[0][1].cfg
    os.makedirs(directory, exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in adapter_state_dict(model).items()},
              os.path.join(directory, ADAPTER_WEIGHTS))
    with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
        json.dump(cfg.to_json(base_model), f, indent=2)


def read_adapter(directory):
    """(LoRAConfig, tensors, base model name) of an adapter folder; a missing, truncated or corrupted file
    is a UserError. Adapters written before LoRAConfig existed read as well."""
    from safetensors.torch import load_file
    cfg_path, w_path = os.path.join(directory, ADAPTER_CONFIG), os.path.join(directory, ADAPTER_WEIGHTS)
    if not os.path.isfile(cfg_path) or not os.path.isfile(w_path):
        raise UserError(
            f"{directory} is not an adapter folder (expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})"
        )
    try:
        with open(cfg_path) as f:
            saved = json.load(f)
        cfg = LoRAConfig.from_json(saved)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{cfg_path}: unreadable adapter config ({type(e).__name__}: {e})")
    except UserError as e:
        raise UserError(f"{cfg_path}: {e}")
    try:
        tensors = load_file(w_path)
    except Exception as e:
        raise UserError(f"{w_path}: truncated or corrupted adapter weights ({e})")
    return cfg, tensors, saved.get("base_model", "?")


def check_adapter(model, directory):
    """(config, tensors) of an adapter, after checking it fits `model` exactly; the model is untouched."""
    cfg, tensors, base_model = read_adapter(directory)
    try:
        names = target_layers(model, cfg.targets)
    except UserError as e:
        raise UserError(f"adapter {directory} does not fit this base model: {e}")
    layer, bases = layer_class(cfg), [model.get_submodule(n) for n in names]
    shared = layer.make_shared(cfg, bases)
    expected = {key: tuple(t.shape) for key, t in shared.saved().items()} if shared is not None else {}
    for n, base in zip(names, bases):
        expected.update({f"{n}.{key}": shape for key, shape in layer.saved_shapes(cfg, base).items()})
    missing, extra = expected.keys() - tensors.keys(), tensors.keys() - expected.keys()
    if missing or extra:
        which = f"base has layer {sorted(missing)[0]} that the adapter lacks" if missing else \
            f"adapter has {sorted(extra)[0]} that the base lacks"
        raise UserError(
            f"adapter {directory} does not fit this base model ({which}; adapter base: {base_model})"
        )
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise UserError(
                f"adapter {directory} does not fit this base model: {key} has shape "
                f"{tuple(tensors[key].shape)}, the base needs {shape} (adapter base: {base_model})"
            )
    return cfg, tensors


def apply_adapter(model, cfg: LoRAConfig, tensors):
    """Inject and fill the layers of an adapter that check_adapter has accepted for this model."""
    inject(model, cfg, start=False)
    layers = lora_layers(model)
    if layers[0][1].shared is not None:
        layers[0][1].shared.load(tensors)
    for name, m in layers:
        m.load({key: tensors[f"{name}.{key}"] for key in type(m).saved_shapes(cfg, m.base)})
    return cfg


@contextmanager
def applied(model, cfg: LoRAConfig, tensors, merged=False):
    """`model` with an adapter (checked by check_adapter) for the with-block, and the base again after it, bit
    for bit: the target weights come back from copies, since merge + unmerge (or a residual init's W - s B0 A0
    and back) would round them. Evaluation applies one adapter after another to one base this way."""
    names = target_layers(model, cfg.targets)
    originals = {n: stored_weight(model.get_submodule(n)) for n in names}
    grads = {p: p.requires_grad for p in model.parameters()}
    apply_adapter(model, cfg, tensors)
    try:
        if merged:
            merge_for_inference(model)
        yield model
    finally:
        with torch.no_grad():
            for name, m in lora_layers(model):
                set_weight(m.base, originals[name])
                parent, child = name.rsplit(".", 1)
                setattr(model.get_submodule(parent), child, m.base)
        for p, flag in grads.items():
            p.requires_grad_(flag)


def updates(model, cfg: LoRAConfig, tensors):
    """[(layer, ΔW, rank)] in model order: each target layer's change of effective weight against `model`'s W,
    in fp64, read through the layer's delta_weight() (plus the change of W itself after a residual init, PiSSA
    or OLoRA), so every variant is covered without code of its own; `rank` is the layer's. The model is left
    as is."""
    before = {n: model.get_submodule(n).weight.detach().double() for n in target_layers(model, cfg.targets)}
    with applied(model, cfg, tensors), torch.no_grad():
        return [(name, (m.base.weight.double() - before[name]) + m.delta_weight().double(), m.rank)
                for name, m in lora_layers(model)]


def load_adapter(model, directory):
    """Inject LoRA as the adapter's config says and load its tensors; the base must fit exactly.
    The result continues training exactly where the saved run stopped (resume calls this)."""
    return apply_adapter(model, *check_adapter(model, directory))


def merge_to_model(base, adapter, out, dtype="fp32") -> str:
    """Base + adapter -> a standard HF model folder (weights merged, tokenizer copied), in fp32 or bf16. The
    base is loaded as the adapter was trained on it; a bf16 or nf4 base is merged in fp32 onto its stored (for
    nf4 dequantized) weights, so the folder computes what training computed (nf4's embeddings and norms are
    the file's, in fp32). Returns what was written."""
    import torch
    from ..modeling import load_model, load_tokenizer
    from ..quant import dequantize_model
    base_dtype = read_adapter(adapter)[0].base_dtype
    model = load_model(base, base_dtype=base_dtype)
    load_adapter(model, adapter)
    unload(dequantize_model(model).float()).to(
        torch.bfloat16 if dtype == "bf16" else torch.float32
    ).save_pretrained(out)
    load_tokenizer(base).save_pretrained(out)
    trained = {"fp32": "", "bf16": "; trained on a bf16 base: merged onto it in fp32",
               "nf4": "; trained on an nf4 base: merged onto its dequantized weights, not quantized again"}
    return f"wrote {out}: {dtype} weights{trained[base_dtype]}"

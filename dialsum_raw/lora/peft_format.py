"""export-peft: an adapter folder as peft's adapter_config.json + adapter_model.safetensors.

The layer class of the adapter's config names peft's config fields and gives each layer's tensors in peft's
form (to_peft), so this file has no per-variant code. Residual inits (PiSSA, OLoRA) are already saved for the
original base, as peft converts them. A variant peft has no form for is refused before anything is written.
"""

import json
import os

from .adapter import read_adapter
from .layers import layer_class


def export_peft(directory, out) -> str:
    """Write the peft folder; returns what was written, saying so when the adapter learned on a stored bf16 or
    quantized base (peft's config has no field for it: load the base the same way before applying it)."""
    from safetensors.torch import save_file
    cfg, tensors, base_model = read_adapter(directory)
    layer = layer_class(cfg)
    per_layer = {}  # layer name -> its saved tensors; "" holds the shared module's (VeRA's projections)
    for key, t in tensors.items():
        name, _, tensor = key.rpartition(".")
        per_layer.setdefault(name, {})[tensor] = t
    peft_tensors = {f"base_model.model.{name}.{key}" if name else f"base_model.{key}": t.contiguous()
                    for name, saved in per_layer.items() for key, t in layer.to_peft(cfg, saved).items()}
    peft_cfg = {"task_type": "SEQ_2_SEQ_LM", "target_modules": list(cfg.targets), "bias": "none",
                "fan_in_fan_out": False, "base_model_name_or_path": base_model, "inference_mode": True,
                "modules_to_save": None, **layer.peft_config(cfg)}
    os.makedirs(out, exist_ok=True)
    save_file(peft_tensors, os.path.join(out, "adapter_model.safetensors"))
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(peft_cfg, f, indent=2)
    base = {"fp32": "",
            "bf16": " (trained on a bf16-stored base: load the base in bf16 to use it as trained)",
            "nf4": " (trained on a quantized base, nf4 with double quantization: load the base with "
                   "bitsandbytes' BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', "
                   "bnb_4bit_use_double_quant=True)"
                   + ("; its LoftQ base is not nf4(W), so it does not apply to that base as trained"
                      if cfg.init == "loftq" else "") + ")"}
    return f"wrote {out}{base[cfg.base_dtype]}"

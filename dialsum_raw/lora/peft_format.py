"""export-peft: an adapter folder as peft's adapter_config.json + adapter_model.safetensors.

The layer class of the adapter's variant names peft's config fields and tensor keys, so this file has no
per-variant code. Residual inits (PiSSA, OLoRA) are already saved for the original base, as peft converts them.
"""

import json
import os

from .adapter import read_adapter
from .layers import VARIANTS


def export_peft(directory, out):
    from safetensors.torch import save_file
    cfg, tensors, base_model = read_adapter(directory)
    layer = VARIANTS[cfg.variant]
    peft_tensors = {}
    for key, t in tensors.items():
        name, _, tensor = key.rpartition(".")  # no name: a shared tensor (VeRA's projections), kept once
        peft_tensors[f"base_model.model.{name}.{layer.PEFT_NAMES[tensor]}" if name else
                     f"base_model.{layer.PEFT_NAMES[tensor]}"] = t.contiguous()
    os.makedirs(out, exist_ok=True)
    save_file(peft_tensors, os.path.join(out, "adapter_model.safetensors"))
    peft_cfg = {"task_type": "SEQ_2_SEQ_LM", "target_modules": list(cfg.targets), "bias": "none",
                "fan_in_fan_out": False, "base_model_name_or_path": base_model, "inference_mode": True,
                "modules_to_save": None, **layer.peft_config(cfg)}
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(peft_cfg, f, indent=2)

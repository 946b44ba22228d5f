"""LoRA from scratch: y = W x + (B A dropout(x)) * scale, with W frozen, and the variants that change it.

    config.py       LoRAConfig: what inject takes, what adapter.json holds
    layers.py       one class per structural variant: LoRALinear, LoRAFALinear, DoRALinear, VeRALinear
    init.py         how A and B start (one function each, one table: INITS), and the Residual save form
                    of the inits that move part of W into the adapter
    adapter.py      inject, merge/unmerge, save and load an adapter folder
    peft_format.py  export-peft
    inspect.py      what an adapter learned, per layer, from each layer's delta_weight()
    combine.py      adapters combined (linear/svd, cat, ties, dare) into one plain-LoRA adapter, from
                    delta_weight()

Every class in VARIANTS, with every init it allows, passes the layer contract (tests/test_contract.py); those
peft has are matched against peft in tests/test_lora.py. LoRA+ is an optimizer setting (the tensors a layer
marks FAST, B, learn K x faster): training.make_optimizer.

    python -m dialsum_raw.lora merge --base MODEL --adapter DIR --out OUT
    python -m dialsum_raw.lora export-peft --adapter DIR --out OUT
    python -m dialsum_raw.lora inspect ADAPTER --base MODEL [--compare ADAPTER2] [--json] [--plot DIR]
    python -m dialsum_raw.lora combine DIR... --out DIR --method linear|cat|svd|ties|dare [--weights ...]
"""

from .adapter import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_state_dict, applied, apply_adapter,
                      check_adapter, inject, load_adapter, lora_layers, merge, merge_for_inference,
                      merge_to_model, read_adapter, save_adapter, target_layers, unload, unmerge, updates)
from .cli import main
from .config import LoRAConfig
from .init import INITS
from .layers import VARIANTS, AdapterLinear, DoRALinear, LoRALinear, VeRALinear, layer_class
from .peft_format import export_peft

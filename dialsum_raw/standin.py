"""Write a random-weight model folder with flan-t5-small's config and tokenizer.

The real weights cannot be downloaded here; a model with the exact architecture stands in for
speed, memory, equivalence and plumbing checks (and --tiny for fast tests).

    python -m dialsum_raw.standin --config ../shared/flan-t5-small --out standin [--tiny]
"""

import argparse
import os
import shutil

from .errors import UserError, run_cli

TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")
TINY = {"d_model": 64, "d_ff": 128, "d_kv": 16, "num_heads": 4, "num_layers": 2, "num_decoder_layers": 2}


def build(config_dir, out, tiny=False, seed=0):
    """Save a random T5 under `out`; returns the path. lm_head gets its own weight (see shared/README)."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    if not os.path.isfile(os.path.join(config_dir, "config.json")):
        raise UserError(f"{config_dir}: no config.json (expected a flan-t5 folder such as ../shared/flan-t5-small)")
    config = T5Config.from_pretrained(config_dir, **(TINY if tiny else {}))
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config)
    # transformers 5.x ties lm_head to shared when building from a config; the real checkpoint
    # does not, so give lm_head an independent weight with T5's own init scale.
    head = torch.empty_like(model.shared.weight).normal_(0.0, config.d_model ** -0.5)
    model.lm_head.weight = torch.nn.Parameter(head)
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(config_dir, name)):
            shutil.copy(os.path.join(config_dir, name), tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m dialsum_raw.standin", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="folder with config.json and tokenizer files")
    p.add_argument("--out", required=True, help="folder to write (replaced if it exists)")
    p.add_argument("--tiny", action="store_true", help=f"small width/depth for fast tests: {TINY}")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    build(a.config, a.out, a.tiny, a.seed)
    from .modeling import count_parameters, load_model
    print(f"wrote {a.out}: {count_parameters(load_model(a.out))[1]:,} parameters")


if __name__ == "__main__":
    run_cli(main)

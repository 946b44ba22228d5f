"""Write a random-weight model folder with a flan-t5 size's shape and flan-t5-small's tokenizer.

The real weights cannot be downloaded here; a model with the exact architecture stands in for
speed, memory, equivalence and plumbing checks (and --tiny for fast tests). It cannot show quality.

    python -m dialsum_raw.standin --config ../shared/flan-t5-small --out standin [--size base | --tiny]
    python -m dialsum_raw.standin --config ../shared/flan-t5-small --size xl   # count and memory only

Without --out (or when the model would not fit in this machine's free memory) the shape is built on
the meta device, without weights: its parameter count and the predicted training memory per process
under DDP and --fsdp are printed, and nothing is written.
"""

import argparse
import os
import shutil

from .errors import UserError, run_cli

TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")
# Overrides of flan-t5-small's config.json: the published google/flan-t5-base, -large, -xl and -xxl shapes
# (2,849,757,184 and 11,135,332,352 parameters for xl and xxl); every size keeps small's vocabulary, d_kv 64
# and gated-GELU feed-forward.
SIZES = {
    "tiny": {
        "d_model": 64,
        "d_ff": 128,
        "d_kv": 16,
        "num_heads": 4,
        "num_layers": 2,
        "num_decoder_layers": 2,
    },
    "small": {},
    "base": {"d_model": 768, "d_ff": 2048, "num_heads": 12, "num_layers": 12, "num_decoder_layers": 12},
    "large": {"d_model": 1024, "d_ff": 2816, "num_heads": 16, "num_layers": 24, "num_decoder_layers": 24},
    "xl": {"d_model": 2048, "d_ff": 5120, "num_heads": 32, "num_layers": 24, "num_decoder_layers": 24},
    "xxl": {"d_model": 4096, "d_ff": 10240, "num_heads": 64, "num_layers": 24, "num_decoder_layers": 24},
}
# Full fine-tuning in fp32 keeps 4 bytes of weight, 4 of gradient and 8 of AdamW moments per parameter
# (activations come on top). DDP holds all of it on every process; FSDP holds 1/N.
STATE_BYTES_PER_PARAMETER = 16


def config(config_dir, size="small"):
    """flan-t5-small's config.json with a size's shape."""
    from transformers import T5Config
    if not os.path.isfile(os.path.join(config_dir, "config.json")):
        raise UserError(
            f"{config_dir}: no config.json (expected a flan-t5 folder such as ../shared/flan-t5-small)"
        )
    return T5Config.from_pretrained(config_dir, **SIZES[size])


def random_model(config_dir, size="small", seed=0):
    """A random T5 of that size, in memory; lm_head gets its own weight (see shared/README)."""
    import torch
    from transformers import T5ForConditionalGeneration
    cfg = config(config_dir, size)
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(cfg)
    # transformers 5.x ties lm_head to shared when building from a config; the real checkpoint
    # does not, so give lm_head an independent weight with T5's own init scale.
    head = torch.empty_like(model.shared.weight).normal_(0.0, cfg.d_model ** -0.5)
    model.lm_head.weight = torch.nn.Parameter(head)
    return model


def build(config_dir, out, tiny=False, seed=0, size="small"):
    """Save a random T5 (with the tokenizer files) under `out`; returns the path."""
    model = random_model(config_dir, "tiny" if tiny else size, seed)
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(config_dir, name)):
            shutil.copy(os.path.join(config_dir, name), tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def memory_lines(parameters, worlds=(2, 4, 8)):
    """Predicted full fine-tuning state per process (not measured: python -m dialsum_raw.bench memory
    measures)."""
    gb = STATE_BYTES_PER_PARAMETER * parameters / 1e9
    return [
        f"predicted full fine-tuning state per process ({STATE_BYTES_PER_PARAMETER} bytes per parameter: "
        "fp32 "
        "weights, gradients, AdamW moments; activations extra):",
        f"  DDP, any number of processes: {gb:.1f} GB",
        "  --fsdp: " + ", ".join(f"N={n}: {gb / n:.1f} GB" for n in worlds),
    ]


def free_bytes():
    """MemAvailable of /proc/meminfo (Linux), else None (unknown: assume it fits)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m dialsum_raw.standin", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="folder with config.json and tokenizer files")
    p.add_argument(
        "--out", help="folder to write (replaced if it exists); without it, count and predict only"
    )
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--size", choices=["small", "base", "large", "xl", "xxl"], default="small",
                       help="flan-t5 shape: small 77M, base 248M, large 783M, xl 2.85B, xxl 11.1B parameters "
                            "(fp32: 4 bytes each)")
    shape.add_argument(
        "--tiny", action="store_true", help=f"small width/depth for fast tests: {SIZES['tiny']}"
    )
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    import torch
    from .modeling import count_parameters, load_model
    size = "tiny" if a.tiny else a.size
    with torch.device("meta"):  # the shape alone: no memory, no init time
        parameters = count_parameters(random_model(a.config, size))[1]
    need, free = 2 * 4 * parameters, free_bytes()  # fp32 weights in memory, and again while saving
    if a.out is None or (free is not None and need > free):
        print(f"flan-t5-{size} shape: {parameters:,} parameters (built on the meta device; nothing written)")
        print("\n".join(memory_lines(parameters)))
        if a.out is not None:
            raise UserError(
                f"not written: building and saving {a.out} needs about {need / 1e9:.0f} GB of memory, "
                f"{free / 1e9:.0f} GB is free"
            )
        return
    build(a.config, a.out, a.tiny, a.seed, a.size)
    print(f"wrote {a.out}: {count_parameters(load_model(a.out))[1]:,} parameters")


if __name__ == "__main__":
    run_cli(main)

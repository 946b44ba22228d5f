"""Write a random-weight model folder with a flan-t5 size's shape and flan-t5-small's tokenizer.

The real weights cannot be downloaded here; a model with the exact architecture stands in for
speed, memory, equivalence and plumbing checks (and --tiny for fast tests). It cannot show quality.

    python -m dialsum_raw.standin --config ../shared/flan-t5-small --out standin [--size base | --tiny]
    python -m dialsum_raw.standin --config ../shared/flan-t5-small --size xl   # count and memory only
    python -m dialsum_raw.standin --config ../shared/flan-t5-small --size xl --out xl   # 11 GB of disk

Without --out (or when the files would not fit on its disk) the shape is built on the meta device,
without weights: its parameter count and the predicted training memory per process under DDP and --fsdp
are printed, and nothing is written. The weights are written a shard (1 GiB) at a time, so xl and xxl are
written on a machine with less memory than they take.
"""

import argparse
import math
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


def skeleton(config_dir, size="small"):
    """The T5 of that size on the meta device (shapes, no memory), lm_head with its own weight: transformers
    5.x ties lm_head to shared when building from a config; the real checkpoint does not (see
    shared/README)."""
    import torch
    from transformers import T5ForConditionalGeneration
    with torch.device("meta"):
        model = T5ForConditionalGeneration(config(config_dir, size))
        model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.shared.weight))
    return model


def _pieces(model):
    """The model cut into the units T5's init sets whole (each attention, feed-forward and layer norm, the
    shared embedding, lm_head), in order, each as (module, {full name: name in the module}); a tied tensor
    is named once, by its first name, as save_pretrained does."""
    from transformers.models.t5 import modeling_t5 as t5
    names = {id(p): n for n, p in reversed(list(model.named_parameters(remove_duplicate=False)))}
    kinds = (t5.T5LayerNorm, t5.T5Attention, t5.T5DenseActDense, t5.T5DenseGatedActDense)
    units = [model.shared, model.lm_head, *(m for m in model.modules() if isinstance(m, kinds))]
    return [(m, {names[id(p)]: n for n, p in m.named_parameters()}) for m in units]


def _fill(model, module):
    """Materialize one piece on the CPU with T5's own init (lm_head: N(0, d_model^-0.5), T5's scale for a
    projection into d_model); the encoder's and decoder's embeddings are tied to shared again."""
    import torch
    module.to_empty(device="cpu")
    with torch.no_grad():
        if module is model.shared:
            module.weight.normal_(0.0, model.config.initializer_factor)
            for stack in (model.encoder, model.decoder):  # the embeddings tied to it
                stack.embed_tokens.weight = module.weight
        elif module is model.lm_head:
            module.weight.normal_(0.0, model.config.d_model ** -0.5)
        else:
            model._init_weights(module)


def random_model(config_dir, size="small", seed=0):
    """A random T5 of that size, in memory; lm_head gets its own weight (see shared/README). The tests'
    tiny and small stand-ins are these weights (build writes them when they fit one shard)."""
    import torch
    from transformers import T5ForConditionalGeneration
    cfg = config(config_dir, size)
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(cfg)
    head = torch.empty_like(model.shared.weight).normal_(0.0, cfg.d_model ** -0.5)
    model.lm_head.weight = torch.nn.Parameter(head)
    return model


def build(config_dir, out, tiny=False, seed=0, size="small", shard_bytes=2 ** 30):
    """Save a random T5 (with the tokenizer files) under `out`; returns the path. Written a shard at a time:
    each piece is filled, saved with its shard and dropped, so the process holds at most one shard (1 GiB)
    of weights; flan-t5-xl (11 GB in fp32) is written on a machine with less free memory than that, as
    model-0000i-of-0000n.safetensors and their index. A model that fits one shard is random_model's, saved
    whole (the tests' stand-ins: their assertions were tuned on those weights)."""
    import json

    import torch
    from safetensors.torch import save_file
    model = skeleton(config_dir, "tiny" if tiny else size)

    def size_of(piece):
        return sum(piece[0].get_parameter(n).numel() * 4 for n in piece[1].values())
    shards = [[]]
    for piece in _pieces(model):
        if shards[-1] and sum(map(size_of, shards[-1])) + size_of(piece) > shard_bytes:
            shards.append([])
        shards[-1].append(piece)
    files = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if len(shards) == 1:  # fits one shard: random_model's weights, saved whole
        random_model(config_dir, "tiny" if tiny else size, seed).save_pretrained(tmp)
        shards = []
    else:
        os.makedirs(tmp)
    torch.manual_seed(seed)
    weight_map = {}
    for file, shard in zip(files, shards):
        tensors = {}
        for module, params in shard:
            _fill(model, module)
            tensors.update({full: module.get_parameter(n).detach() for full, n in params.items()})
        save_file(tensors, os.path.join(tmp, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        for module, _ in shard:
            module.to_empty(device="meta")  # drop the piece's memory
        del tensors
    if shards:
        total = sum(map(size_of, (piece for shard in shards for piece in shard)))
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        model.config.save_pretrained(tmp)
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
    from .modeling import count_parameters
    size = "tiny" if a.tiny else a.size
    parameters = count_parameters(skeleton(a.config, size))[1]  # the shape alone: no memory, no init time
    need = 4 * parameters  # fp32 on disk; memory: one shard at a time (build)
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(a.out)) if a.out else ".").free
    if a.out is None or need > free:
        print(f"flan-t5-{size} shape: {parameters:,} parameters (built on the meta device; nothing written)")
        print("\n".join(memory_lines(parameters)))
        if a.out is not None:
            raise UserError(
                f"not written: {a.out} needs about {need / 1e9:.1f} GB of disk, {free / 1e9:.1f} GB is free"
            )
        return
    build(a.config, a.out, a.tiny, a.seed, a.size)
    print(f"wrote {a.out}: {written_parameters(a.out):,} parameters")


def written_parameters(folder):
    """Parameters in a model folder's safetensors file(s), counted from their headers (nothing loaded)."""
    from safetensors import safe_open

    from .modeling import weight_files
    total = 0
    for path in weight_files(folder):
        with safe_open(path, "pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


if __name__ == "__main__":
    run_cli(main)

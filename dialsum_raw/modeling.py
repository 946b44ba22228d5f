"""Loading models and tokenizers through the normal from_pretrained path, with clear errors.

The same call serves a hub id (google/flan-t5-small, -base, -large) for users online and a
local folder (a stand-in, a merged adapter, a saved checkpoint) for everyone.
"""

import os

from .errors import UserError, first_line


def _check_source(name_or_path, what):
    if os.path.isdir(name_or_path):
        if not os.path.isfile(os.path.join(name_or_path, "config.json")) and what == "model":
            raise UserError(f"{name_or_path} is not a model folder (no config.json); "
                            "give a hub id or a folder written by save_pretrained")
    elif (
        os.path.exists(name_or_path)
        or name_or_path.startswith((".", "/", "~"))
        or name_or_path.count("/") > 1
    ):
        raise UserError(f"{what} not found: {name_or_path} (not a folder)")


def load_tokenizer(name_or_path, what="model"):
    """The tokenizer saved with a model (`what` names the source in error messages)."""
    from transformers import AutoTokenizer
    _check_source(name_or_path, what)
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except Exception as e:
        raise UserError(f"cannot load tokenizer from {name_or_path} ({type(e).__name__}: {first_line(e)})"
                        + ("" if os.path.isdir(name_or_path) else "; offline? give a local folder instead"))


# How --base-dtype stores the frozen base. Trainable tensors (LoRA's) and optimizer state stay fp32 either
# way.
BASE_DTYPES = ("fp32", "bf16", "nf4")
STORAGE_RULE = (
    "nf4 stores every Linear inside T5's blocks (q, k, v, o, wi/wi_0/wi_1, wo, the LoRA-wrapped ones "
    "included) in 4 bits (NF4, double-quantized) and the rest (embeddings, lm_head, layer norms) in the "
    "run's compute dtype: bf16 under bf16 compute, as the bf16 base stores them, fp32 under fp32 compute. "
    "bf16 stores every weight in bf16 (transformers 5 keeps T5's wo in fp32 only for fp16)"
)


def load_model(name_or_path, dropout=None, base_dtype="fp32", compute="fp32"):
    """A seq2seq model with its weights stored as `base_dtype` says (see STORAGE_RULE); `dropout` overrides
    config.dropout_rate. fp32 and bf16 load through from_pretrained; nf4 quantizes as it reads, tensor by
    tensor, so the process never holds the whole base in fp32 (load_quantized), and stores the rest in
    `compute`, the run's compute dtype (choose_precision's): under bf16, a bf16 residual stream, as on the
    bf16 base, is what keeps an nf4 step within 1.35x of a bf16-base step (docs/qlora.md)."""
    from transformers import AutoModelForSeq2SeqLM
    _check_source(name_or_path, "model")
    kwargs = {} if dropout is None else {"dropout_rate": dropout}
    try:
        if base_dtype == "nf4":
            return load_quantized(name_or_path, kwargs, dense_dtype(base_dtype, compute))
        return AutoModelForSeq2SeqLM.from_pretrained(
            name_or_path, dtype=dense_dtype(base_dtype, compute), **kwargs)
    except UserError:
        raise
    except Exception as e:
        hint = (
            "is the weights file intact?"
            if os.path.isdir(name_or_path)
            else "offline? give a local folder instead"
        )
        raise UserError(
            f"cannot load model from {name_or_path} ({type(e).__name__}: {first_line(e)}); {hint}"
        )


def dense_dtype(base_dtype, compute="fp32"):
    """The dtype of what a base stores unquantized (STORAGE_RULE): bf16 for a bf16 base and for nf4 under bf16
    compute, fp32 otherwise."""
    import torch
    bf16 = base_dtype == "bf16" or base_dtype == "nf4" and compute == "bf16"
    return torch.bfloat16 if bf16 else torch.float32


def quantized_names(model):
    """The Linear layers that --base-dtype nf4 stores in 4 bits: every one inside T5's blocks."""
    from torch import nn
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".block." in f".{n}."}


def stored_bytes(model, base_dtype, compute="fp32"):
    """Bytes of a model's weights stored as `base_dtype` (and `compute`, for nf4's rest) say, counted on its
    shapes (the meta device will do), shared tensors once: the bench's prediction for sizes too large to build
    here."""
    from .quant import nf4_bytes
    quantized = quantized_names(model) if base_dtype == "nf4" else set()
    dense = dense_dtype(base_dtype, compute).itemsize
    total, seen = 0, set()
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += (
                    nf4_bytes(p.numel())
                    if name in quantized
                    else p.numel() * dense
                )
    return total


def load_quantized(name_or_path, config_kwargs, dense_dtype):
    """The model with quantized_names() in NF4 (reporting `dense_dtype`) and the rest in `dense_dtype`, built
    on the meta device and filled tensor by tensor from its safetensors file(s): each block weight is read,
    quantized and dropped before the next is read. Tied weights follow from_pretrained's rule: a tied tensor
    shares its source unless the file holds different values."""
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, GenerationConfig

    from .quant import NF4Linear, quantize
    config = AutoConfig.from_pretrained(name_or_path, **config_kwargs)
    with torch.device("meta"):
        model = AutoModelForSeq2SeqLM.from_config(config)
    targets, dense = quantized_names(model), {}
    mmap_large_buffers(True)
    try:
        for path, key, tensor in read_safetensors(weight_files(name_or_path)):
            module, leaf = key.rsplit(".", 1)
            if module in targets and leaf == "weight":
                parent, child = module.rsplit(".", 1)
                setattr(model.get_submodule(parent), child,
                        NF4Linear(quantize(tensor), dtype=dense_dtype, source=(path, key)))
            else:
                dense[key] = tensor.to(dense_dtype)
    finally:
        mmap_large_buffers(False)
    for key, tensor in dense.items():
        module, leaf = key.rsplit(".", 1)
        model.get_submodule(module)._parameters[leaf] = nn.Parameter(tensor)
    for target, source in getattr(model, "all_tied_weights_keys", {}).items():
        if target not in dense or torch.equal(dense[target], dense[source]):
            module, leaf = target.rsplit(".", 1)
            model.get_submodule(module)._parameters[leaf] = model.get_parameter(source)
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise UserError(f"{name_or_path}: the weights lack {missing[0]} (and {len(missing) - 1} more)")
    try:
        model.generation_config = GenerationConfig.from_pretrained(name_or_path)
    except OSError:  # no generation_config.json: from_config's default stays
        pass
    return model.eval()


def mmap_large_buffers(on):
    """While the nf4 loader reads (on), have glibc give every buffer of 1 MiB or more its own mapping,
    returned to the system when freed; after (off), serve buffers under 32 MiB from the heap and keep up to
    64 MiB free at its top, where glibc's own rule settles once a large buffer has been freed (mallopt
    M_MMAP_THRESHOLD, M_TRIM_THRESHOLD; elsewhere nothing). By default glibc raises the threshold to the
    largest buffer freed so far, so the loader's weight-sized buffers come from the heap, and the holes they
    leave between the codes kept stay resident (271 MB on the large stand-in). On for the steps, it costs a
    page fault for every large activation of every step: train.py turns it on for them only with
    --gradient-checkpointing, which has chosen memory over time (docs/qlora.md)."""
    import ctypes
    import ctypes.util
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return
    mallopt(-3, 1 << 20 if on else 32 << 20)  # -3: M_MMAP_THRESHOLD
    if not on:
        mallopt(-1, 64 << 20)  # -1: M_TRIM_THRESHOLD


def weight_files(name_or_path):
    """The safetensors file(s) of a model folder or hub id (one file, or the shards of its index)."""
    import json

    from transformers.utils import cached_file
    found = cached_file(name_or_path, "model.safetensors", _raise_exceptions_for_missing_entries=False)
    if found:
        return [found]
    index = cached_file(
        name_or_path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False
    )
    if not index:
        raise UserError(f"{name_or_path}: --base-dtype nf4 reads safetensors weights, and there are none "
                        "(model.safetensors or model.safetensors.index.json)")
    with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    return [cached_file(name_or_path, shard) for shard in shards]


def read_safetensors(paths, keys=None):
    """(file, name, tensor) of every tensor in safetensors files (or of those named in `keys`), each read into
    memory of its own with plain file reads: a memory map would keep the pages of the tensors already read
    in the process's resident set."""
    import json

    import torch
    dtypes = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    for path in paths:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
            for key, info in header.items():
                if key == "__metadata__" or keys is not None and key not in keys:
                    continue
                if info["dtype"] not in dtypes:
                    raise UserError(
                        f"{path}: {key} is {info['dtype']}; --base-dtype nf4 reads F32, BF16 or F16"
                    )
                start, end = info["data_offsets"]
                f.seek(8 + size + start)
                data = bytearray(end - start)
                f.readinto(data)
                yield path, key, torch.frombuffer(data, dtype=dtypes[info["dtype"]]).reshape(info["shape"])


def compute_device():
    """Where one process generates or trains: the GPU when there is one, else the CPU. Every single-process
    command (evaluate, summarize, bench) moves its model here; training under torchrun gives each rank its
    own."""
    import torch
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_dropout_impl(model, impl):
    """With impl "fast", every nn.Dropout of the model (T5's embedding, attention-output, feed-forward and
    final dropouts, and LoRA's when injected before) becomes dropout.Dropout, and T5's attention, whose
    probability dropout is a functional call, runs through dropout.attention. "torch" leaves the model
    as loaded (nn.Dropout and HF's sdpa, bit for bit). Eval outputs are the same either way."""
    from torch import nn

    from . import dropout
    if impl == "fast":
        for holder in list(model.modules()):
            for name, child in holder.named_children():
                if type(child) is nn.Dropout:
                    setattr(holder, name, dropout.Dropout(child.p))
        dropout.use_fast_attention(model)
    return model


def cpu_bf16_units():
    """The bf16 multiply units of this CPU ("AMX-BF16", "AVX512-BF16") or "" without them, as torch's
    own CPU probe reports. Without them oneDNN emulates bf16 and a bf16 step is no faster than fp32.
    A torch build without the probe answers "": fp32 is the safe choice."""
    import torch
    probe = getattr(torch._C._cpu, "_get_cpu_capability", None)
    caps = probe() if probe else {}
    return next(
        (name for key, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16")) if caps.get(key)),
        "",
    )


def choose_precision(precision, device):
    """(name, reason): the compute dtype of a run, "bf16" or "fp32", and why, for its log and summary.

    auto means bf16 where the hardware multiplies bf16 natively (Ampere+ GPUs; CPUs with AMX or
    AVX512-BF16), else fp32. fp16 is refused: T5 overflows in fp16 (config validation says so first)."""
    import torch
    if str(precision).lower() in ("fp16", "float16", "half"):
        raise UserError("precision fp16 is refused: T5 overflows in fp16; use bf16 or fp32")
    if precision not in ("auto", "bf16", "fp32"):
        raise UserError(f"--precision must be auto, bf16 or fp32, got {precision!r}")
    if precision == "fp32":
        return "fp32", "--precision fp32"
    if (
        device.type == "cuda"
    ):  # bf16 tensor cores came with Ampere, compute capability 8.0 (ROCm GPUs all have bf16)
        cap = torch.cuda.get_device_capability(device)
        native = bool(torch.version.hip) or cap >= (8, 0)
        name = f"this GPU ({torch.cuda.get_device_name(device)}, compute capability {cap[0]}.{cap[1]})"
        why = (
            f"{name} multiplies bf16 natively"
            if native
            else f"{name} predates Ampere (8.0), so bf16 runs emulated"
        )
    elif device.type == "cpu":
        units = cpu_bf16_units()
        native = bool(units)
        why = (f"this CPU multiplies bf16 natively ({units})" if native
               else "this CPU has no AMX or AVX512-BF16, so bf16 runs emulated")
    else:
        native, why = False, f"no bf16 rule for {device.type}"
    if precision == "bf16":
        return "bf16", "--precision bf16" + ("" if native else f"; {why} (likely slower than fp32)")
    return ("bf16" if native else "fp32"), f"auto: {why}"


def check_base_precision(base_dtype, precision):
    """A bf16-stored base computes in bf16: refused, in one line, where the run's compute dtype is fp32."""
    if base_dtype == "bf16" and precision == "fp32":
        raise UserError(
            "--base-dtype bf16 needs bf16 compute, but this run computes in fp32 (--precision fp32, or "
            "auto on hardware without native bf16): pass --precision bf16, or --base-dtype fp32 or nf4"
        )


def inference_storage(settings, device, adapters):
    """load_model's base_dtype and compute for an evaluate or summarize run: --base-dtype when given, else the
    one its adapter folders were trained on (a QLoRA adapter is evaluated on the base it learned to correct;
    they must agree), else fp32; compute as --precision resolves on this device."""
    from .lora import read_adapter
    trained = {folder: read_adapter(folder)[0].base_dtype for folder in adapters}
    if not settings.base_dtype and len(set(trained.values())) > 1:
        raise UserError("the adapters were trained on bases stored differently ("
                        + ", ".join(f"{folder}: {dtype}" for folder, dtype in trained.items())
                        + "): give --base-dtype, or evaluate them in separate runs")
    base_dtype = settings.base_dtype or next(iter(trained.values()), "fp32")
    compute = choose_precision(settings.precision, device)[0]
    check_base_precision(base_dtype, compute)
    return {"base_dtype": base_dtype, "compute": compute}


def autocast_for(precision, device):
    """A context factory for the forward pass: bf16 autocast (CUDA or CPU) when `choose_precision`
    picks bf16, else nothing. Weights, gradients and optimizer state stay fp32 either way."""
    from contextlib import nullcontext

    import torch
    if choose_precision(precision, device)[0] == "fp32":
        return nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def count_parameters(model):
    """(trainable, total), counting shared tensors once, and a 4-bit base's weights (buffers of NF4Linear) as
    the parameters they are."""
    from .quant import quantized_linears
    seen, trainable, total = set(), 0, sum(m.weight.numel() for _, m in quantized_linears(model))
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def parameter_report(model) -> str:
    """The notebook's three lines: trainable, all, percentage."""
    trainable, total = count_parameters(model)
    return (f"trainable model parameters: {trainable:,}\n"
            f"all model parameters: {total:,}\n"
            f"percentage of trainable model parameters: {100 * trainable / total:.2f}%")

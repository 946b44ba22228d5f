"""Loading models and tokenizers through the normal from_pretrained path, with clear errors.

The same call serves a hub id (google/flan-t5-small, -base, -large) for users online and a
local folder (a stand-in, a merged adapter, a saved checkpoint) for everyone.
"""

import os

from .errors import UserError


def _check_source(name_or_path, what):
    if os.path.isdir(name_or_path):
        if not os.path.isfile(os.path.join(name_or_path, "config.json")) and what == "model":
            raise UserError(f"{name_or_path} is not a model folder (no config.json); "
                            "give a hub id or a folder written by save_pretrained")
    elif os.path.exists(name_or_path) or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise UserError(f"{what} not found: {name_or_path} (not a folder)")


def load_tokenizer(name_or_path, what="model"):
    """The tokenizer saved with a model (`what` names the source in error messages)."""
    from transformers import AutoTokenizer
    _check_source(name_or_path, what)
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except Exception as e:
        raise UserError(f"cannot load tokenizer from {name_or_path} ({type(e).__name__}: {_first_line(e)})"
                        + ("" if os.path.isdir(name_or_path) else "; offline? give a local folder instead"))


def load_model(name_or_path, dropout=None):
    """A seq2seq model in fp32 (autocast handles bf16); `dropout` overrides config.dropout_rate."""
    import torch
    from transformers import AutoModelForSeq2SeqLM
    _check_source(name_or_path, "model")
    kwargs = {"dtype": torch.float32}
    if dropout is not None:
        kwargs["dropout_rate"] = dropout
    try:
        return AutoModelForSeq2SeqLM.from_pretrained(name_or_path, **kwargs)
    except Exception as e:
        hint = "is the weights file intact?" if os.path.isdir(name_or_path) else "offline? give a local folder instead"
        raise UserError(f"cannot load model from {name_or_path} ({type(e).__name__}: {_first_line(e)}); {hint}")


def autocast_for(precision, device):
    """A context factory: bf16 autocast on CUDA, plain fp32 elsewhere. T5 overflows in fp16, so
    fp16 is never offered (config validation refuses it)."""
    from contextlib import nullcontext
    import torch
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if bf16 and device.type != "cuda":
        raise UserError("--precision bf16 needs a CUDA GPU here; use fp32 (or auto) on CPU")
    return (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else nullcontext


def _first_line(e):
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else "no message"


def count_parameters(model):
    """(trainable, total), counting shared tensors once."""
    seen, trainable, total = set(), 0, 0
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

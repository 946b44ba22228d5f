"""Batched beam search over unique dialogues, original order restored.

Batches are cut from dialogues sorted by source length, so little compute goes to padding, and
each distinct dialogue is generated once however many reference rows share it. settings.engine
picks the search: `own` (beam.py: T5 models, several times faster) or `hf` (model.generate: any
seq2seq model, and the oracle the tests hold `own` to). Either way the result is token for token
what model.generate gives one dialogue at a time with the same settings.
"""

import warnings
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from . import beam, data
from .errors import UserError
from .modeling import autocast_for


def generation_kwargs(settings) -> dict:
    """Everything generate needs, explicit: HF's default max_length of 20 never applies."""
    return {"num_beams": settings.num_beams, "max_new_tokens": settings.max_new_tokens,
            "min_new_tokens": settings.min_new_tokens, "early_stopping": True,
            "length_penalty": settings.length_penalty, "no_repeat_ngram_size": settings.no_repeat_ngram_size,
            "do_sample": False}


def hf_generate(model, input_ids, attention_mask, settings) -> list:
    """model.generate's best summary per row as token ids, in beam.generate's form: no start token,
    EOS kept, no padding after it (a row without EOS ran to max_new_tokens, the output's width)."""
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **generation_kwargs(settings))
    return [beam.until_eos(row[1:], model.generation_config.eos_token_id) for row in out.tolist()]


@contextmanager
def weights_cast_once(model):
    """Autocast casts each weight to bf16 once per batch, not at every decode step, inside this block.

    Autocast caches a weight's bf16 copy only if the weight requires grad; a frozen one (the base under
    LoRA, a merged adapter, any model after requires_grad_(False)) is cast again at every step, 24% of a
    bf16 search. Generation runs under no_grad, where the flag records nothing, so frozen weights are
    marked for the search and unmarked after it."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


def quantized(model):
    """A copy of the model with dynamic int8 linear layers (int8 weights, activations quantized per call,
    fp32 elsewhere), for quick previews on CPU: --quantize int8. The model itself is left as it is."""
    from torch.ao.quantization import quantize_dynamic
    if next(model.parameters()).device.type != "cpu":
        raise UserError("--quantize int8 runs on CPU only (dynamic int8 kernels); drop it on a GPU")
    with warnings.catch_warnings():  # torch announces a successor API (torchao); this one still works
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def length_sorted_batches(sources, size) -> list:
    """Indices of `sources` (token id lists) in batches of `size`, longest first: little padding per batch,
    and peak memory shows at once. Every engine the bench races gets the same batches."""
    order = sorted(range(len(sources)), key=lambda i: -len(sources[i]))
    return [order[start:start + size] for start in range(0, len(order), size)]


def check_length(model, settings):
    """Refuse --max-new-tokens beyond the positions the model was built for (T5: n_positions, 512), before any
    work: the own engine allocates its caches and relative-position bias for all of them at once (its bias
    grows with the square: a million tokens asked for terabytes)."""
    config = model.config
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if limit and settings.max_new_tokens > limit:
        raise UserError(
            f"--max-new-tokens {settings.max_new_tokens} is more than the {limit} positions this model "
            f"was built for (its config's n_positions); give at most {limit}"
        )


@torch.no_grad()
def generate_ids(model, tokenizer, dialogues, settings, desc="generate") -> list:
    """The summary's token ids per entry of `dialogues` (texts), generating each distinct text once."""
    check_length(model, settings)
    search = beam.generate if settings.engine == "own" else hf_generate
    if settings.engine == "own":
        beam.check_supported(model)
    unique = list(dict.fromkeys(dialogues))
    if not unique:  # nothing to generate (a rank given no validation dialogues): the tokenizer refuses []
        return []
    ids, _ = data.encode_sources(tokenizer, unique, settings.max_source_len)  # the prompt kept whole
    device = next(model.parameters()).device
    model.eval()
    if settings.quantize == "int8":
        model = quantized(model)
    autocast = autocast_for(
        "fp32" if settings.quantize == "int8" else settings.precision, device
    )  # int8: fp32 around
    collate = data.Collator(tokenizer.pad_token_id)
    summaries = [None] * len(unique)
    with tqdm(total=len(unique), desc=desc, unit="dialogue") as bar, weights_cast_once(model):
        for chunk in length_sorted_batches(ids, settings.eval_batch_size):
            batch = collate([{"input_ids": ids[i], "labels": [0]} for i in chunk])
            with autocast():
                out = search(
                    model, batch["input_ids"].to(device), batch["attention_mask"].to(device), settings
                )
            for i, tokens in zip(chunk, out):
                summaries[i] = tokens
            bar.update(len(chunk))
    by_text = dict(zip(unique, summaries))
    return [by_text[d] for d in dialogues]


def summarize(model, tokenizer, dialogues, settings, desc="generate") -> list:
    """One summary text per entry of `dialogues` (texts)."""
    ids = generate_ids(model, tokenizer, dialogues, settings, desc)
    return [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]

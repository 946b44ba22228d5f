"""Batched beam search over unique dialogues, original order restored.

Batches are cut from dialogues sorted by source length, so little compute goes to padding, and
each distinct dialogue is generated once however many reference rows share it. settings.engine
picks the search: `own` (beam.py: T5 models, several times faster) or `hf` (model.generate: any
seq2seq model, and the oracle the tests hold `own` to). Either way the result is token for token
what model.generate gives one dialogue at a time with the same settings.
"""

import torch
from tqdm.auto import tqdm

from . import beam, data
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
    return [beam.until_eos(row[1:].tolist(), model.generation_config.eos_token_id) for row in out]


@torch.no_grad()
def generate_ids(model, tokenizer, dialogues, settings, desc="generate") -> list:
    """The summary's token ids per entry of `dialogues` (texts), generating each distinct text once."""
    search = beam.generate if settings.engine == "own" else hf_generate
    if settings.engine == "own":
        beam.check_supported(model)
    unique = list(dict.fromkeys(dialogues))
    if not unique:  # nothing to generate (a rank given no validation dialogues): the tokenizer refuses []
        return []
    ids, _ = data.encode_sources(tokenizer, unique, settings.max_source_len)  # the prompt kept whole
    order = sorted(range(len(unique)), key=lambda i: -len(ids[i]))  # longest first: peak memory shows at once
    device = next(model.parameters()).device
    autocast = autocast_for(settings.precision, device)
    collate = data.Collator(tokenizer.pad_token_id)
    summaries = [None] * len(unique)
    model.eval()
    size = settings.eval_batch_size
    with tqdm(total=len(unique), desc=desc, unit="dialogue") as bar:
        for start in range(0, len(order), size):
            chunk = order[start:start + size]
            batch = collate([{"input_ids": ids[i], "labels": [0]} for i in chunk])
            with autocast():
                out = search(model, batch["input_ids"].to(device), batch["attention_mask"].to(device), settings)
            for i, tokens in zip(chunk, out):
                summaries[i] = tokens
            bar.update(len(chunk))
    by_text = dict(zip(unique, summaries))
    return [by_text[d] for d in dialogues]


def summarize(model, tokenizer, dialogues, settings, desc="generate") -> list:
    """One summary text per entry of `dialogues` (texts)."""
    ids = generate_ids(model, tokenizer, dialogues, settings, desc)
    return [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]

"""Batched beam search over unique dialogues, original order restored.

Batches are cut from dialogues sorted by source length, so little compute goes to padding, and
each distinct dialogue is generated once however many reference rows share it. The result is
token for token what model.generate gives one dialogue at a time with the same settings.
"""

import torch
from tqdm.auto import tqdm

from . import data
from .modeling import autocast_for


def generation_kwargs(settings) -> dict:
    """Everything generate needs, explicit: HF's default max_length of 20 never applies."""
    return {"num_beams": settings.num_beams, "max_new_tokens": settings.max_new_tokens,
            "min_new_tokens": settings.min_new_tokens, "early_stopping": True,
            "length_penalty": settings.length_penalty, "no_repeat_ngram_size": settings.no_repeat_ngram_size,
            "do_sample": False}


@torch.no_grad()
def summarize(model, tokenizer, dialogues, settings, desc="generate") -> list:
    """One summary per entry of `dialogues` (texts), generating each distinct text once."""
    unique = list(dict.fromkeys(dialogues))
    ids, _ = data.tokenize(tokenizer, [data.prompt(d) for d in unique], settings.max_source_len)
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
                out = model.generate(input_ids=batch["input_ids"].to(device),
                                     attention_mask=batch["attention_mask"].to(device), **generation_kwargs(settings))
            for i, text in zip(chunk, tokenizer.batch_decode(out, skip_special_tokens=True)):
                summaries[i] = text.strip()
            bar.update(len(chunk))
    by_text = dict(zip(unique, summaries))
    return [by_text[d] for d in dialogues]

"""One evaluation run: one loop over the models to evaluate, each generated, scored and reported side by side.

A model is a name and how to get it: the base itself (zero-shot, "original"), the base with an adapter applied
(--adapter [NAME=]DIR, repeatable; a bare DIR is the notebook's "peft") or a full fine-tune's folder
(--instruct [NAME=]DIR, repeatable; a bare DIR is "instruct"). The notebook's three columns are this loop with
three entries. The base is loaded once and the original summaries generated once; each adapter is applied,
merged, generated and taken off in turn (lora.applied restores the base bit for bit), so an adapter's
summaries are those of a run with it alone. Full fine-tunes come last, each loaded alone once the base is let
go. Every name and folder is checked before the first summary is generated. Each model's generation is timed.
With --quantize int8 (a preview), each model also generates its first INT8_SAMPLE summaries unquantized, and
report.md says how far the preview agrees with them.
"""

import dataclasses
import os
import re
import time
from contextlib import contextmanager

from . import checkpoint, data, lora, metrics, report
from .errors import UserError
from .generation import generation_kwargs, summarize
from .modeling import compute_device, inference_storage, load_model, load_tokenizer

INT8_SAMPLE = 32  # dialogues per model generated without int8 too, to measure the preview's agreement
NAME = re.compile(
    r"[A-Za-z0-9_.+,:-]+"
)  # no '=' (NAME=DIR), '/' or spaces: it heads a CSV column and a JSON key
RESERVED = (
    "original",
    "human_baseline",
    "meta",
    "intervals",
)  # the base's name, results.csv's and metrics.json's


@dataclasses.dataclass(frozen=True)
class Model:
    """One model of the evaluation: its name, what the report says it is, and how to get it: the base itself,
    the base with `adapter` (LoRAConfig, tensors) applied, or the model folder `folder` loaded on its own."""
    name: str
    source: str
    adapter: tuple = None
    folder: str = None


def named(values, default):
    """[(name, folder)] of --adapter / --instruct values: NAME=DIR, or a bare DIR named `default`. A folder
    that itself contains '=' (a sweep's run folder) is a bare DIR when it exists as given."""
    out = []
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep or os.path.isdir(value) or not NAME.fullmatch(name):
            name, folder = default, value
        out.append((name, folder))
    return out


def models_to_evaluate(settings):
    """[(name, folder)] of the adapters and of the instruct models, and the reference, checked: the names
    unique and not reserved, each instruct folder a model folder. Adapters are checked against the base once
    it loads."""
    adapters = named(settings.adapter, "peft")
    instructs = named(settings.instruct, "instruct")
    seen = set()
    for flag, pairs in (("--instruct", instructs), ("--adapter", adapters)):
        for name, folder in pairs:
            if name in RESERVED or name in seen:
                raise UserError(
                    f"{flag} {name}={folder}: the name {name!r} is "
                    + ("reserved" if name in RESERVED else "given twice")
                    + "; name each model once, "
                    "NAME=DIR"
                )
            seen.add(name)
    for name, folder in instructs:
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise UserError(f"--instruct {folder} is not a model folder (no config.json)")
    names = [n for n, _ in adapters + instructs]
    reference = settings.reference or (names[0] if names else None)
    if settings.reference and settings.reference not in names:
        raise UserError(f"--reference {settings.reference} is not one of the models evaluated "
                        f"({', '.join(names) or 'only the original'})")
    return adapters, instructs, reference


@contextmanager
def opened(model: Model, base, device, storage):
    """The model to generate with: the base, the base with the adapter merged (taken off after; unmerged on a
    bf16 or nf4 base, see lora.merge_for_inference), or the folder (stored as --base-dtype says)."""
    if model.folder:
        yield load_model(model.folder, **storage).to(device)
    elif model.adapter:
        with lora.applied(base, *model.adapter, merged=True):  # inference at base speed
            yield base
    else:
        yield base


def run(settings) -> dict:
    out = settings.output_dir
    checkpoint.prepare_output_dir(out, settings.overwrite, "metrics.json")
    adapters, instructs, reference = models_to_evaluate(settings)

    dialogues = data.load_splits(settings.data, (settings.split,))[settings.split]
    dialogues = dialogues[:settings.limit] if settings.limit else dialogues
    bad = [i for i in settings.show if i >= len(dialogues)]
    if bad:
        raise UserError(
            f"--show {bad[0]} is out of range: {len(dialogues)} {settings.split} dialogues are evaluated"
        )
    texts = [d.dialogue for d in dialogues]
    device = compute_device()
    tokenizer = load_tokenizer(settings.model)

    refs = [d.refs for d in dialogues]
    summaries, seconds, int8 = {}, {}, {}

    def generate(name, model):
        start = time.perf_counter()
        summaries[name] = summarize(model, tokenizer, texts, settings, desc=name)
        seconds[name] = time.perf_counter() - start
        if settings.quantize == "int8":
            k = min(INT8_SAMPLE, len(texts))
            exact = summarize(model, tokenizer, texts[:k], dataclasses.replace(settings, quantize="none"),
                              desc=f"{name} unquantized")
            rouge = {kind: metrics.rouge(preds, refs[:k], settings.use_stemmer)["per_row"]
                     for kind, preds in (("int8", summaries[name][:k]), ("exact", exact))}
            int8[name] = {
                "dialogues": k,
                "identical": sum(a == b for a, b in zip(summaries[name], exact)),
                "rouge_difference": {m: rouge["int8"][m] - rouge["exact"][m] for m in rouge["int8"]},
            }

    storage = inference_storage(settings, device, [folder for _, folder in adapters])
    base = load_model(settings.model, **storage).to(device)
    # every adapter is checked against the base (corrupted, not an adapter, another base) before any
    # generation
    models = [Model("original", settings.model),
              *(Model(name, f"{settings.model} + {folder}", adapter=lora.check_adapter(base, folder))
                for name, folder in adapters),
              *(Model(name, folder, folder=folder) for name, folder in instructs)]
    for m in models:
        if m.folder:
            base = None  # its last use is behind: each full fine-tune is loaded alone
        with opened(m, base, device, {**storage, "base_dtype": settings.base_dtype or "fp32"}) as model:
            generate(m.name, model)
        del model  # a full fine-tune goes before the next one loads

    order = ["original", *(n for n, _ in instructs), *(n for n, _ in adapters)]  # the notebook's column order
    summaries = {n: summaries[n] for n in order}
    scores = {name: metrics.rouge(preds, refs, settings.use_stemmer) for name, preds in summaries.items()}
    first = scores["original"]
    if first["non_ascii_texts"]:
        print(
            f"note: {first['non_ascii_texts']} references or summaries contain non-ASCII characters; they "
            "are "
            "kept, but rouge_score's tokenizer scores only [a-z0-9] words and drops the rest"
        )
    meta = {
        "split": settings.split,
        "data": settings.data,
        "dialogues": len(dialogues),
        "rows": first["rows"],
        "models": {m.name: m.source for m in sorted(models, key=lambda m: order.index(m.name))},
        "reference": reference,
        "generation": generation_kwargs(settings),
        "use_stemmer": settings.use_stemmer,
        "max_source_len": settings.max_source_len,
        "quantize": settings.quantize,
        "generation_seconds": {name: round(seconds[name], 1) for name in order},
    }
    if int8:
        meta["int8_agreement"] = {n: int8[n] for n in order}
    intervals = metrics.intervals(scores, report.pairs(order, reference), settings.bootstrap)
    chart_note = report.write(out, dialogues, summaries, scores, intervals, settings.show, meta)
    if chart_note:
        print(f"note: {chart_note}")
    return {"scores": scores, "intervals": intervals, "summaries": summaries, "dialogues": dialogues,
            "chart_note": chart_note, "seconds": {n: seconds[n] for n in order}}


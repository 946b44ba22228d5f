"""One evaluation run: the base zero-shot ("original"), a full fine-tune ("instruct") and the
base plus a LoRA adapter ("peft"), generated, scored and reported side by side.

The base is loaded once; its LoRA variant is the same object with the adapter injected and merged.
Each model's generation is timed. With --quantize int8 (a preview), each model also generates its
first INT8_SAMPLE summaries unquantized, and report.md says how far the preview agrees with them.
"""

import dataclasses
import os
import time

from . import checkpoint, data, lora, metrics, report
from .errors import UserError
from .generation import generation_kwargs, summarize
from .modeling import compute_device, inference_base_dtype, load_model, load_tokenizer

INT8_SAMPLE = 32  # dialogues per model generated without int8 too, to measure the preview's agreement


def run(settings) -> dict:
    out = settings.output_dir
    checkpoint.prepare_output_dir(out, settings.overwrite, "metrics.json")
    if settings.instruct and not os.path.isfile(os.path.join(settings.instruct, "config.json")):
        raise UserError(f"--instruct {settings.instruct} is not a model folder (no config.json)")

    dialogues = data.load_splits(settings.data, (settings.split,))[settings.split]
    dialogues = dialogues[:settings.limit] if settings.limit else dialogues
    bad = [i for i in settings.show if i >= len(dialogues)]
    if bad:
        raise UserError(f"--show {bad[0]} is out of range: {len(dialogues)} {settings.split} dialogues are evaluated")
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
            int8[name] = {"dialogues": k, "identical": sum(a == b for a, b in zip(summaries[name], exact)),
                          "rouge_difference": {m: rouge["int8"][m] - rouge["exact"][m] for m in rouge["int8"]}}

    models = {"original": settings.model}
    base_dtype = inference_base_dtype(settings, device)
    model = load_model(settings.model, base_dtype=base_dtype).to(device)
    # a corrupted or mismatched adapter fails now, not after the first model's run
    adapter = lora.check_adapter(model, settings.adapter) if settings.adapter else None
    generate("original", model)
    if settings.adapter:
        lora.apply_adapter(model, *adapter)
        lora.merge_for_inference(model)  # at base speed where exact up to float rounding (an fp32 base)
        generate("peft", model)
        models["peft"] = f"{settings.model} + {settings.adapter}"
    if settings.instruct:
        del model
        model = load_model(settings.instruct, base_dtype=base_dtype).to(device)
        generate("instruct", model)
        models["instruct"] = settings.instruct

    scores = {name: metrics.rouge(preds, refs, settings.use_stemmer) for name, preds in summaries.items()}
    first = next(iter(scores.values()))
    if first["non_ascii_texts"]:
        print(f"note: {first['non_ascii_texts']} references or summaries contain non-ASCII characters; they are "
              "kept, but rouge_score's tokenizer scores only [a-z0-9] words and drops the rest")
    meta = {"split": settings.split, "data": settings.data, "dialogues": len(dialogues), "rows": first["rows"],
            "models": models, "generation": generation_kwargs(settings), "use_stemmer": settings.use_stemmer,
            "max_source_len": settings.max_source_len, "quantize": settings.quantize,
            "generation_seconds": {name: round(t, 1) for name, t in seconds.items()}}
    if int8:
        meta["int8_agreement"] = int8
    intervals = metrics.intervals(scores, report.IMPROVEMENTS, settings.bootstrap)
    chart_note = report.write(out, dialogues, summaries, scores, intervals, settings.show, meta)
    if chart_note:
        print(f"note: {chart_note}")
    return {"scores": scores, "intervals": intervals, "summaries": summaries, "dialogues": dialogues,
            "chart_note": chart_note, "seconds": seconds}

"""summarize: deduplication, order, options, through either engine; engine hf against the notebook's
per-row generate here (engine own against model.generate is tests/test_beam.py)."""

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dialsum_raw import beam, data, generation
from dialsum_raw.config import Settings
from dialsum_raw.generation import generation_kwargs, summarize
from dialsum_raw.modeling import load_model, load_tokenizer


def _reference(model, tokenizer, texts, settings):
    """The oracle: model.generate called one dialogue at a time, as the notebook does (on the same source
    ids: an over-long dialogue is shortened inside the prompt, see data.encode_sources)."""
    out = []
    for text in texts:
        (source,), _ = data.encode_sources(tokenizer, [text], settings.max_source_len)
        ids = model.generate(input_ids=torch.tensor([source]), **generation_kwargs(settings))
        out.append(tokenizer.decode(ids[0], skip_special_tokens=True).strip())
    return out


@pytest.fixture(scope="module")
def references():
    """{model: _reference's summaries}, each computed once for this module: they do not depend on the batch
    size under test."""
    return {}


@pytest.mark.parametrize("batch_size", [1, 3, 8])
@pytest.mark.parametrize("which", ["trained", "random"])
def test_batched_equals_per_example_generate(trained, tiny, corpus, references, batch_size, which):
    """The trained model stops at EOS (early stopping path); the random one writes varied text to the cap."""
    path = trained["full"] if which == "trained" else tiny
    model, tok = load_model(path).eval(), load_tokenizer(path)
    texts = [d.dialogue for d in corpus["test"][:10]]
    s = Settings(
        precision="fp32",
        engine="hf",
        eval_batch_size=batch_size,
        num_beams=4,
        max_new_tokens=48,
        max_source_len=256,
    )
    if which not in references:
        with torch.no_grad():
            references[which] = _reference(model, tok, texts, s)
    expect = references[which]
    got = summarize(model, tok, texts, s)
    assert got == expect
    lengths = [len(tok(t)["input_ids"]) for t in got]
    if which == "trained":
        assert max(lengths) < 48  # beams ended at EOS, not at the cap
    else:
        assert len(set(got)) == 10 and min(lengths) > 40  # distinct texts, run to the cap


def test_options_reach_generate_and_no_default_max_length(tiny, corpus):
    model = load_model(tiny).eval()
    tok = load_tokenizer(tiny)
    texts = [d.dialogue for d in corpus["test"][:3]]
    s = Settings(
        precision="fp32",
        engine="hf",
        eval_batch_size=2,
        num_beams=2,
        max_new_tokens=40,
        no_repeat_ngram_size=2,
        length_penalty=0.5,
    )
    got = summarize(model, tok, texts, s)
    assert got == _reference(model, tok, texts, s)
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in got]
    assert max(len(x) for x in ids) > 20  # HF's default max_length of 20 never applies
    for x in ids:
        bigrams = list(zip(x, x[1:]))
        assert len(bigrams) == len(set(bigrams))


@pytest.mark.parametrize("engine", ["own", "hf"])
def test_repeated_dialogues_generated_once_order_kept(tiny, corpus, monkeypatch, engine):
    model = load_model(tiny).eval()
    tok = load_tokenizer(tiny)
    a, b = corpus["test"][0].dialogue, corpus["test"][1].dialogue
    calls = []
    owner, name = (beam, "generate") if engine == "own" else (generation, "hf_generate")
    real = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda m, ids, *rest: calls.append(ids.shape[0]) or real(m, ids, *rest))
    s = Settings(precision="fp32", engine=engine, eval_batch_size=8, num_beams=2, max_new_tokens=8)
    got = summarize(model, tok, [a, b, a, a, b, b], s)
    assert calls == [2]
    assert got[0] == got[2] == got[3] and got[1] == got[4] == got[5]


def test_min_new_tokens_holds_back_eos(trained, corpus):
    model, tok = load_model(trained["full"]).eval(), load_tokenizer(trained["full"])
    texts = [d.dialogue for d in corpus["test"][:4]]
    free = summarize(
        model, tok, texts, Settings(precision="fp32", engine="hf", num_beams=2, max_new_tokens=40)
    )
    held = summarize(
        model,
        tok,
        texts,
        Settings(precision="fp32", engine="hf", num_beams=2, max_new_tokens=40, min_new_tokens=20),
    )
    n = lambda t: len(tok(t, add_special_tokens=False)["input_ids"])
    assert min(n(t) for t in free) < 19 and min(n(t) for t in held) >= 19  # EOS counts as the 20th token
    assert held == _reference(
        model,
        tok,
        texts,
        Settings(precision="fp32", engine="hf", num_beams=2, max_new_tokens=40, min_new_tokens=20),
    )


class _WeightCasts(TorchDispatchMode):
    """Records each cast (aten._to_copy) of one of `weights` (data pointers), as autocast issues them."""

    def __init__(self, weights):
        super().__init__()
        self.weights, self.casts = weights, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in self.weights:
            self.casts.append(args[0].data_ptr())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("engine", ["own", "hf"])
def test_bf16_casts_each_frozen_weight_once_per_batch(tiny, corpus, engine):
    """Autocast caches a weight's bf16 copy only if it requires grad: frozen weights (the base under LoRA,
    a merged adapter) would be cast again at every decode step."""
    model, tok = load_model(tiny).eval().requires_grad_(False), load_tokenizer(tiny)
    texts = [d.dialogue for d in corpus["test"][:3]]
    counter = _WeightCasts({p.data_ptr() for p in model.parameters()})
    with counter:
        summarize(model, tok, texts, Settings(precision="bf16", engine=engine, eval_batch_size=4, num_beams=2,
                                              max_new_tokens=6))
    assert counter.casts and len(counter.casts) == len(set(counter.casts))
    assert not any(p.requires_grad for p in model.parameters())  # the flags are given back


def test_int8_preview_leaves_the_model_alone(tiny, corpus):
    """--quantize int8 generates with a dynamic-int8 copy: linear layers replaced there, not in the model."""
    model, tok = load_model(tiny).eval(), load_tokenizer(tiny)
    texts = [d.dialogue for d in corpus["test"][:3]]
    s = Settings(precision="fp32", engine="own", eval_batch_size=4, num_beams=2, max_new_tokens=6)
    int8 = generation.quantized(model)
    assert isinstance(int8.lm_head, torch.ao.nn.quantized.dynamic.Linear) and isinstance(
        model.lm_head, torch.nn.Linear
    )
    assert len(summarize(model, tok, texts, dataclasses.replace(s, quantize="int8"))) == 3
    assert isinstance(model.lm_head, torch.nn.Linear)


def test_int8_agreement_in_the_report(tiny, tmp_path):
    """An evaluation with --quantize int8 states in report.md, per model, how many of its first summaries
    equal the unquantized ones (and the ROUGE difference on them); each model's generation is timed."""
    from conftest import CORPUS
    from dialsum_raw import compare

    s = Settings(
        model=tiny,
        data=CORPUS,
        output_dir=str(tmp_path / "e"),
        limit=3,
        eval_batch_size=4,
        num_beams=2,
        max_new_tokens=6,
        precision="fp32",
        quantize="int8",
        bootstrap=10,
    )
    result = compare.run(s)
    exact = summarize(
        load_model(tiny).eval(),
        load_tokenizer(tiny),
        [d.dialogue for d in result["dialogues"]],
        dataclasses.replace(s, quantize="none"),
    )
    same = sum(a == b for a, b in zip(result["summaries"]["original"], exact))
    report = (tmp_path / "e" / "report.md").read_text()
    assert f"- original: {same}/3 summaries identical; ROUGE difference rouge1 " in report
    assert result["seconds"]["original"] > 0

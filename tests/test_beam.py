"""Our beam search (engine own) against its oracle, model.generate one dialogue at a time.

fp32 is pinned (precision="fp32"): the oracle comparison is token for token.
"""

import pytest
import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dialsum_raw import beam, data, lora
from dialsum_raw.config import Settings
from dialsum_raw.errors import UserError
from dialsum_raw.generation import generate_ids
from dialsum_raw.modeling import load_model

OPTIONS = {"plain": {}, "min+ngram": {"min_new_tokens": 9, "no_repeat_ngram_size": 2, "length_penalty": 0.6}}


def _settings(engine, batch_size, **over):
    return Settings(
        engine=engine, eval_batch_size=batch_size, precision="fp32", **{"max_source_len": 128, **over}
    )


def _oracle(model, tok, texts, **over):
    """model.generate one dialogue at a time (engine hf, batch 1), as token ids."""
    return generate_ids(model, tok, texts, _settings("hf", 1, **over))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: a second thread costs more in synchronisation than it saves (ten times more when
    other processes share the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def texts(corpus):
    """30 test dialogues and 2 odd ones that the trained model summarizes at length: dialogues in one
    batch then finish at different steps."""
    return [d.dialogue for d in corpus["test"][:30]] + ["a " * 200, "#Person1#: " + "What? " * 50]


@pytest.fixture(scope="module")
def models(trained, tiny):
    """The trained tiny model ends at EOS (early stopping, dialogues leaving the batch at different
    steps) but writes nearly the same summary for every dialogue; the random one writes a different
    summary per dialogue (so it shows cross-attention errors) and runs to the cap."""
    return {"trained": load_model(trained["full"]).eval(), "random": load_model(tiny).eval()}


@pytest.fixture(scope="module")
def oracles(models, tokenizer, texts):
    """Oracle outputs, computed once per (model, search settings) and shared by all batch sizes."""
    cache = {}

    def get(which, **over):
        key = (which, tuple(sorted(over.items())))
        if key not in cache:
            cache[key] = _oracle(models[which], tokenizer, texts, **over)
        return cache[key]
    return get


@pytest.mark.parametrize("batch_size", [1, 8, 32])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("beams", [1, 4])
@pytest.mark.parametrize("which", ["trained", "random"])
def test_own_equals_generate_one_dialogue_at_a_time(models, oracles, tokenizer, texts, which, beams, option,
                                                    batch_size):
    over = {"num_beams": beams, "max_new_tokens": 16 if which == "random" else 24, **OPTIONS[option]}
    expect = oracles(which, **over)
    assert generate_ids(models[which], tokenizer, texts, _settings("own", batch_size, **over)) == expect
    if which == "trained":
        assert (
            sum(x[-1] == 1 for x in expect) >= 28 and len({len(x) for x in expect}) > 1
        )  # EOS at varied steps
    else:
        assert len({tuple(x) for x in expect}) == len(texts)  # one distinct summary per dialogue


def test_lora_unmerged_and_merged(tiny, trained, tokenizer, texts):
    model = load_model(tiny).eval()
    lora.load_adapter(model, trained["lora"])
    over = {"num_beams": 4, "max_new_tokens": 12}
    for state in ("unmerged", "merged"):
        if state == "merged":
            lora.merge(model)
        assert lora.lora_layers(model)[0][1].merged == (state == "merged")
        expect = _oracle(model, tokenizer, texts[:12], **over)
        assert generate_ids(model, tokenizer, texts[:12], _settings("own", 8, **over)) == expect, state


def test_standin_equals_generate_or_ties(small, tokenizer, corpus):
    """flan-t5-small's shape with random weights: every output equals HF's, or HF's own score of the
    two outputs is the same within 1e-4 (a near tie that float rounding may order either way)."""
    model = load_model(small).eval()
    texts = [d.dialogue for d in corpus["test"][:5]]
    over = {"num_beams": 4, "max_new_tokens": 10}
    expect = _oracle(model, tokenizer, texts, **over)
    got = generate_ids(model, tokenizer, texts, _settings("own", 5, **over))
    sources, _ = data.encode_sources(tokenizer, texts, 128)
    gaps = beam.score_gaps(model, sources, got, expect, 1.0)
    print(f"stand-in: {len(gaps)} of {len(texts)} outputs differ from HF's, score gaps {gaps}")
    assert all(gap < 1e-4 for gap in gaps.values())


def test_sequence_score_is_generates_score(small, tokenizer, corpus):
    """The tie check above holds only if sequence_score is the score generate ranked by."""
    model = load_model(small).eval()
    source, _ = data.encode_sources(tokenizer, [corpus["test"][0].dialogue], 128)
    out = model.generate(input_ids=torch.tensor(source), num_beams=4, max_new_tokens=6, early_stopping=True,
                         length_penalty=0.5, output_scores=True, return_dict_in_generate=True)
    tokens = out.sequences[0, 1:].tolist()
    assert beam.sequence_score(model, source[0], tokens, 0.5) == pytest.approx(
        out.sequences_scores.item(), abs=1e-5
    )


def test_cross_attention_kv_once_per_dialogue(models, tokenizer, texts):
    """Each decoder layer projects the encoder output to K and V once per batch, for the dialogues, not the
    beams."""
    model = models["random"]
    seen = []
    hooks = [
        block.layer[1].EncDecAttention.k.register_forward_hook(
            lambda m, args, out: seen.append(args[0].shape[0])
        )
        for block in model.decoder.block
    ]
    try:
        generate_ids(model, tokenizer, texts[:8], _settings("own", 8, num_beams=4, max_new_tokens=5))
    finally:
        for h in hooks:
            h.remove()
    assert seen == [8] * len(model.decoder.block)


def _sorted_batch(tokenizer, texts, max_len=128):
    """texts as generate_ids batches them: sorted by source length, longest first, padded on the right."""
    sources, _ = data.encode_sources(tokenizer, texts, max_len)
    return data.Collator(tokenizer.pad_token_id)([{"input_ids": x, "labels": [0]}
                                                  for x in sorted(sources, key=len, reverse=True)])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_encoder_is_t5s_encoder_to_the_bit(models, tokenizer, texts, precision):
    """The own encoder loop (position bias and padding mask summed once, each layer's input cast once) gives
    T5's encoder output exactly, padded positions included, in fp32 and under bf16 autocast."""
    model, batch = models["random"], _sorted_batch(tokenizer, texts[:8], 512)
    assert (batch["attention_mask"] == 0).any()  # the mask matters
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
        expect = model.encoder(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        got = beam._encoder(model, batch["input_ids"], batch["attention_mask"])
    assert torch.equal(got, expect)


def test_cross_attention_reads_each_groups_own_width(models, tokenizer, texts, monkeypatch):
    """At every decode step, cross-attention reads each group of GROUP_ROWS dialogues still running up to its
    own longest source (not the batch's), the groups re-formed as dialogues leave."""
    model, batch = models["trained"], _sorted_batch(tokenizer, texts, 512)
    lengths = batch["attention_mask"].sum(1).tolist()
    seen, calls, step, sdpa = [], [], beam._decode_step, F.scaled_dot_product_attention
    def check(model, tokens, t, cache, cross, cross_bias, groups, bias):
        running = (
            (cross_bias[:, 0, 0] == 0).sum(1).tolist()
        )  # the source length of each dialogue still running
        calls.clear()
        out = step(model, tokens, t, cache, cross, cross_bias, groups, bias)
        read = [(b - a, w) for a, b, w in groups] * len(model.decoder.block)
        seen.append((len(running), groups == beam._groups(running) and calls == read))
        return out
    def spy(q, k, v, **kw):
        if q.shape[2] == 4:  # cross-attention: the 4 beams fold into the query axis (self-attention: 1 query)
            calls.append((q.shape[0], k.shape[2]))
        return sdpa(q, k, v, **kw)
    monkeypatch.setattr(beam, "_decode_step", check)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    beam.generate(
        model,
        batch["input_ids"],
        batch["attention_mask"],
        _settings("own", 32, num_beams=4, max_new_tokens=24),
    )
    assert all(ok for _, ok in seen) and len({n for n, _ in seen}) > 2  # dialogues left at different steps
    widths = [w for _, _, w in beam._groups(lengths)]
    assert widths[0] == max(lengths) and len(set(widths)) > 1


def test_padding_in_the_cross_cache_is_finite(models, tokenizer, texts, monkeypatch):
    """Once dialogues leave, groups re-form and may read a row past its own encoder group's width: K and V
    there must be finite (then masked), whatever the memory held. Here every new_empty tensor starts as
    NaN."""
    new_empty = torch.Tensor.new_empty
    monkeypatch.setattr(
        torch.Tensor, "new_empty", lambda x, *a, **k: new_empty(x, *a, **k).fill_(float("nan"))
    )
    batch = _sorted_batch(tokenizer, texts, 512)
    with torch.no_grad():
        kv, lengths = beam._encode(models["random"], batch["input_ids"], batch["attention_mask"])
    assert len(set(lengths)) > 1 and torch.isfinite(kv).all()


def test_finished_dialogues_leave_the_batch(models, tokenizer, texts, monkeypatch):
    model, rows = models["trained"], []
    step = beam._decode_step
    monkeypatch.setattr(
        beam, "_decode_step", lambda m, tokens, *a: rows.append(len(tokens)) or step(m, tokens, *a)
    )
    generate_ids(model, tokenizer, texts, _settings("own", 32, num_beams=4, max_new_tokens=24))
    assert rows[0] == 4 * 32 and rows == sorted(rows, reverse=True) and rows[-1] <= 4 * 2


def test_greedy_takes_the_argmax_before_the_running_score(models, tokenizer, texts, monkeypatch):
    """Greedy picks the argmax of the processed logits, as HF does. Two logits 2e-7 apart stay apart in
    fp32 near 1, but merge once a running score of about -52 (five uniform steps) is added first."""
    vocab = models["random"].config.vocab_size
    close = torch.zeros(vocab)
    close[8], close[9] = 1.0, 1.0 + 2e-7
    assert close[9] > close[8] and close[9] - 52 == close[8] - 52  # the premise: fp32 merges them at -52
    logits = lambda t: torch.zeros(vocab) if t < 5 else close  # token 0 (not EOS) five times, then 8 or 9
    monkeypatch.setattr(
        beam, "_decode_step", lambda model, tokens, t, *rest: logits(t).expand(len(tokens), -1)
    )
    got = generate_ids(
        models["random"], tokenizer, texts[:2], _settings("own", 2, num_beams=1, max_new_tokens=6)
    )
    assert got == [[0] * 5 + [9]] * 2


class _HostReads(TorchDispatchMode):
    """Counts the operations that read a tensor's value on the host (item, nonzero, boolean-mask indexing;
    tolist is counted by the test): on a GPU each one waits for the queue."""

    def __init__(self, reads):
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        boolean = func is torch.ops.aten.index.Tensor and any(
            i is not None and i.dtype == torch.bool for i in args[1]
        )
        if boolean or func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default):
            self.reads.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("which, ngram", [("trained", 0), ("random", 3)])
def test_host_reads_per_step(models, tokenizer, texts, monkeypatch, which, ngram):
    """At most two reads per decode step (which dialogues finished; the summaries of those that did) and one
    per batch (the encoder widths): with dialogues finishing at different steps (trained), and with the
    n-gram ban on (random)."""
    batch = _sorted_batch(tokenizer, texts)
    reads, steps = [], []
    step, tolist = beam._decode_step, torch.Tensor.tolist
    monkeypatch.setattr(beam, "_decode_step", lambda *a: steps.append(1) or step(*a))
    monkeypatch.setattr(torch.Tensor, "tolist", lambda x: reads.append("tolist") or tolist(x))
    settings = _settings("own", 32, num_beams=4, max_new_tokens=24, no_repeat_ngram_size=ngram)
    with _HostReads(reads):
        out = beam.generate(models[which], batch["input_ids"], batch["attention_mask"], settings)
    assert which == "random" or len({len(x) for x in out}) > 1  # dialogues left the batch at different steps
    print(f"{which}: {len(reads)} host reads in {len(steps)} steps")
    assert len(reads) <= 2 * len(steps) + 1


@pytest.mark.parametrize("beams", [1, 4])
def test_bf16_autocast(models, tokenizer, texts, beams):
    """Under CPU bf16 autocast, with log_softmax in fp32 and greedy's argmax tie-break (bf16 logits tie
    often), the output is generate's under the same autocast; bf16 rounds differently in the two
    forward passes, so a rare near tie may go the other way."""
    model, over = models["random"], {"num_beams": beams, "max_new_tokens": 16}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = generate_ids(model, tokenizer, texts[:16], _settings("own", 16, **over))
        expect = _oracle(model, tokenizer, texts[:16], **over)
    assert sum(a == b for a, b in zip(got, expect)) >= 14


def test_unsupported_model_names_engine_hf(tokenizer, texts):
    from transformers import BartConfig, BartForConditionalGeneration
    config = BartConfig(vocab_size=len(tokenizer), d_model=16, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                        decoder_ffn_dim=32, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                        bos_token_id=0, forced_eos_token_id=None)
    model = BartForConditionalGeneration(config).eval()
    with pytest.raises(UserError, match="--engine hf"):
        generate_ids(model, tokenizer, texts[:1], _settings("own", 1, max_new_tokens=3))
    assert len(generate_ids(model, tokenizer, texts[:1], _settings("hf", 1, max_new_tokens=3))[0]) == 3

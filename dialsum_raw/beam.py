"""Our own batched beam search for T5: HF's search, without copying what never changes.

HF's generate expands the encoder output num_beams times and, at every step, reorders its whole
cache by beam, cross-attention keys and values included, though they never change. Here:

- the encoder runs once per dialogue, and each decoder layer's cross-attention K and V are computed
  once per dialogue; a dialogue's beams share them by folding the beams into the query axis
  ([dialogues, heads, beams, d] against [dialogues, heads, source, d]);
- the encoder runs on length-sorted groups of GROUP_ROWS dialogues, each cut to its longest source, with
  the position bias and padding mask summed once per group (HF's sums them in every layer), and each
  group's cross-attention reads K and V only up to that width;
- only the self-attention cache, which grows with the summary, is reordered: its live positions are
  copied into a second buffer, both allocated once for max_new_tokens;
- a dialogue leaves the batch as soon as its search is done, so cost follows the dialogues still running.

The search is transformers 5.x `_beam_search` with early_stopping=True, step for step: log_softmax
in fp32, the processors (min_new_tokens, no_repeat_ngram_size) on the log-probs, the top 2 x beams
candidates, finished hypotheses scored by sum / generated_length ** length_penalty, where the length
counts the new tokens including EOS but not the decoder start token. With early_stopping=True a
dialogue is done once it holds num_beams finished hypotheses (HF's early-stop heuristic can only
fire after that), or at max_new_tokens. num_beams=1 is HF's greedy search: the argmax of the processed
logits.

The forward pass calls the model's own modules (embeddings, layer norms, q/k/v/o, the feed-forward's
projections and activation, lm_head, relative position bias), so LoRALinear layers, merged or not, and
T5 checkpoints (gated or not) with fp32 weights, as load_model loads them, work unchanged; bf16 comes
from autocast (fp16 weights are not supported: T5 overflows in fp16). The model must be in eval mode.
"""

import torch
from torch.nn import functional as F

from .errors import UserError

NEG = -1.0e9  # HF's "never pick this" score offset; the same constant keeps ties and sums identical
GROUP_ROWS = 8  # dialogues per encoder call, and per cross-attention call in the decoder


def check_supported(model):
    """A UserError naming --engine hf for a model this search does not know how to run."""
    config = model.config
    eos = model.generation_config.eos_token_id
    if config.model_type != "t5" or not config.is_encoder_decoder:
        raise UserError(
            f"--engine own runs T5 models only; this one is {config.model_type!r}: use --engine hf"
        )
    if not isinstance(eos, int):
        raise UserError(
            f"--engine own expects a single EOS token id, this model has {eos!r}: use --engine hf"
        )


def _heads(x, att, rows, length):
    """[rows * length, heads * d] -> [rows, heads, length, d]."""
    return x.view(rows, length, att.n_heads, att.key_value_proj_dim).transpose(1, 2)


def _feed_forward(layer, h, dtype):
    """T5LayerFF (norm, feed-forward, residual) with its input cast to the compute dtype once. Under autocast
    HF's casts the same input once per projection, and its gated form takes the activations back to fp32
    before wo (to the weight's dtype) for autocast to cast them down again: exact, but two more copies."""
    ff = layer.DenseReluDense
    x = layer.layer_norm(h).to(dtype)
    hidden = ff.act(ff.wi_0(x)) * ff.wi_1(x) if hasattr(ff, "wi_0") else ff.act(ff.wi(x))
    return h + ff.wo(hidden)


def _encoder(model, input_ids, attention_mask):
    """The encoder's last hidden state, T5's own blocks called one by one with the position bias and the
    padding mask summed once per call; HF's encoder sums them again in every layer, a fresh
    [rows, heads, source, source] tensor each time (on CPU a large allocation page-faults)."""
    encoder, (rows, width) = model.encoder, input_ids.shape
    att0 = encoder.block[0].layer[0].SelfAttention
    bias = att0.compute_bias(width, width, device=input_ids.device).masked_fill(  # bidirectional (encoder)
        attention_mask[:, None, None, :] == 0, NEG)
    h = encoder.embed_tokens(input_ids)
    device = input_ids.device.type
    dtype = (
        torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    )  # q/k/v's dtype
    for block in encoder.block:
        norm, att = block.layer[0].layer_norm, block.layer[0].SelfAttention
        x = norm(h).to(dtype)  # once, not once per projection
        q, k, v = (_heads(proj(x), att, rows, width) for proj in (att.q, att.k, att.v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        h = h + att.o(out.transpose(1, 2).reshape(rows, width, -1))
        h = _feed_forward(block.layer[-1], h, dtype)
    return encoder.final_layer_norm(h)


def _encode(model, input_ids, attention_mask):
    """Each decoder layer's cross-attention K and V, once per dialogue: [layers, 2, dialogues, heads, source,
    d], and the source lengths.

    The encoder runs on groups of GROUP_ROWS dialogues, each group cut to its own longest source
    (rows arrive sorted by length, padded on the right), so a big batch pays for no more padding in
    the encoder than small ones; K and V past a source's end are finite and masked."""
    n, src = input_ids.shape
    lengths = attention_mask.sum(1).tolist()  # one read on the host per batch, not one per group
    cross = [block.layer[1].EncDecAttention for block in model.decoder.block]
    kv = None
    for start, end, width in _groups(lengths):
        memory = _encoder(model, input_ids[start:end, :width], attention_mask[start:end, :width])
        for i, a in enumerate(cross):
            for j, proj in enumerate((a.k, a.v)):
                x = _heads(proj(memory), a, end - start, width)
                if kv is None:  # its dtype is the projection's (bf16 under autocast)
                    kv = x.new_empty(len(cross), 2, n, a.n_heads, src, a.key_value_proj_dim)
                kv[i, j, start:end, :, :width] = x
        kv[:, :, start:end, :, width:] = 0  # finite, for groups formed once dialogues have left
    return kv, lengths


def _groups(lengths):
    """(first, end, width) per run of GROUP_ROWS dialogues (sorted by source length): cross-attention reads
    each run's K and V up to its own longest source, not the batch's."""
    return [
        (a, a + len(lengths[a : a + GROUP_ROWS]), max(lengths[a : a + GROUP_ROWS]))
        for a in range(0, len(lengths), GROUP_ROWS)
    ]


def _decode_step(model, tokens, t, cache, cross, cross_bias, groups, bias):
    """Logits [rows, vocab] for one token per row at position t; writes its self-attention K and V into
    cache [layers, 2, rows, heads, positions, d] at t.

    rows = dialogues x beams, beams of a dialogue adjacent; cross and cross_bias (0, or NEG past a source's
    end) are per dialogue, read by groups (_groups). The one step every search calls: a fused or
    static-cache form replaces this."""
    rows, n, dtype = (
        tokens.shape[0],
        cross.shape[2],
        cross.dtype,
    )  # the projections' dtype (bf16 under autocast)
    beams = rows // n
    h = model.decoder.embed_tokens(tokens)  # [rows, d_model]
    for i, block in enumerate(model.decoder.block):
        norm, att = block.layer[0].layer_norm, block.layer[0].SelfAttention
        x = norm(h).to(dtype)  # once, not once per projection
        cache[i, 0, :, :, t] = att.k(x).view(rows, att.n_heads, -1)
        cache[i, 1, :, :, t] = att.v(x).view(rows, att.n_heads, -1)
        q = att.q(x).view(rows, att.n_heads, 1, -1)
        out = F.scaled_dot_product_attention(
            q,
            cache[i, 0, :, :, : t + 1],
            cache[i, 1, :, :, : t + 1],
            attn_mask=bias[:, :, t : t + 1, : t + 1],
            scale=1.0,
        )  # T5: no 1/sqrt(d)
        h = h + att.o(out.reshape(rows, -1))
        norm, att = block.layer[1].layer_norm, block.layer[1].EncDecAttention
        q = att.q(norm(h)).view(n, beams, att.n_heads, -1).transpose(1, 2)  # beams fold into the query axis
        out = torch.cat(
            [
                F.scaled_dot_product_attention(
                    q[a:b],
                    cross[i, 0, a:b, :, :w],
                    cross[i, 1, a:b, :, :w],
                    attn_mask=cross_bias[a:b, :, :, :w],
                    scale=1.0,
                )
                for a, b, w in groups
            ]
        )
        h = h + att.o(out.transpose(1, 2).reshape(rows, -1))
        h = _feed_forward(block.layer[-1], h, dtype)
    h = model.decoder.final_layer_norm(h)
    config = (
        model.config
    )  # original T5 rescales before lm_head, T5 v1.1 / FLAN does not (5.x flag; 4.x: tied)
    if getattr(config, "scale_decoder_outputs", config.tie_word_embeddings):
        h = h * config.d_model ** -0.5
    return model.lm_head(h)


def _ban(scores, history, t, settings, eos):
    """HF's processors at step t on the log-probs (beam search) or logits (greedy); history [rows, t + 1]
    starts with the decoder start token, which n-grams include as HF's do. The banned tokens are scattered
    into a mask, so nothing is read on the host."""
    if t < settings.min_new_tokens:
        scores[:, eos] = -float("inf")
    n = settings.no_repeat_ngram_size
    if n and t + 1 >= n:
        windows = history.unfold(1, n, 1)
        repeat = (windows[..., :-1] == history[:, None, t + 2 - n :]).all(
            -1
        )  # window starts with the last n-1 tokens
        vocab = scores.shape[-1]
        banned = torch.where(
            repeat, windows[..., -1], vocab
        )  # a window that does not repeat bans a spare column
        mask = torch.zeros(len(scores), vocab + 1, dtype=torch.bool, device=scores.device).scatter_(
            1, banned, True
        )
        scores.masked_fill_(mask[:, :vocab], -float("inf"))
    return scores


def until_eos(ids, eos) -> list:
    """A finished hypothesis's tokens: up to and including the first EOS, or all if it ran to the cap."""
    return ids[:ids.index(eos) + 1] if eos in ids else ids


@torch.no_grad()
def sequence_score(model, input_ids, tokens, length_penalty) -> float:
    """The score beam search ranks a finished summary by, sum of log-probs / len(tokens) ** length_penalty
    (no processors), from one teacher-forced forward pass: tells a near tie from a real difference."""
    device = next(model.parameters()).device
    decoder_input = [model.config.decoder_start_token_id] + tokens[:-1]
    logits = model(input_ids=torch.tensor([input_ids], device=device),
                   decoder_input_ids=torch.tensor([decoder_input], device=device)).logits[0]
    picked = F.log_softmax(logits.float(), dim=-1).gather(1, torch.tensor(tokens, device=device)[:, None])
    return picked.sum().item() / len(tokens) ** length_penalty


def score_gaps(model, sources, ours, theirs, length_penalty) -> dict:
    """{row: |score(ours) - score(theirs)|} for the rows where two searches' summaries differ; a gap
    within float noise (1e-4) is a tie that either search may break either way."""
    score = lambda i, tokens: sequence_score(model, sources[i], tokens, length_penalty)
    return {i: abs(score(i, a) - score(i, b)) for i, (a, b) in enumerate(zip(ours, theirs)) if a != b}


def _take(x, index):
    """x[b, index[b, j], ...] for each dialogue b (HF's _gather_beams)."""
    return x.gather(1, index.view(*index.shape, *[1] * (x.dim() - 2)).expand(*index.shape, *x.shape[2:]))


@torch.no_grad()
def generate(model, input_ids, attention_mask, settings) -> list:
    """The best summary's token ids (EOS included when reached, no start token) per row of input_ids.

    On the host it reads once per step (which dialogues finished), once more on a step where some finish
    (their summaries), and once per batch (the encoder widths): on a GPU each read waits for the queue."""
    n, beams, steps = input_ids.shape[0], settings.num_beams, settings.max_new_tokens
    eos, start = model.generation_config.eos_token_id, model.config.decoder_start_token_id
    device = input_ids.device
    cross, lengths = _encode(model, input_ids, attention_mask)
    groups = _groups(lengths)
    cross_bias = torch.zeros(n, 1, 1, input_ids.shape[1], dtype=cross.dtype, device=device).masked_fill(
        attention_mask[:, None, None, :] == 0, NEG
    )  # additive, built once: a boolean mask is converted per call
    att0 = model.decoder.block[0].layer[0].SelfAttention
    bias = att0.compute_bias(steps, steps, device=device).to(
        cross.dtype
    )  # causal decoder: bidirectional=False
    layers, _, _, heads, _, d = cross.shape
    # Two self-attention caches for all max_new_tokens, allocated once: each step copies the live positions
    # of the beams that go on from one into the other, with no allocation (a fresh one page-faults).
    cache, spare = cross.new_empty(2, layers, 2, n * beams, heads, steps, d)

    seqs = torch.full((n, beams, steps + 1), start, dtype=torch.long, device=device)  # running beams
    scores = torch.full((n, beams), NEG, device=device)
    scores[:, 0] = 0.0  # only the first beam's continuations count at step 0, as in HF
    done_seqs, done_scores = seqs.clone(), torch.full((n, beams), NEG, device=device)
    done = torch.zeros((n, beams), dtype=torch.bool, device=device)
    width = 2 * beams if beams > 1 else 1  # candidates per dialogue and step
    in_top_beams = torch.arange(width, device=device) < beams
    everyone = torch.arange(n, device=device)
    active = list(range(n))  # original row of each dialogue still running
    results = [None] * n

    for t in range(steps):
        rows = len(active) * beams
        logits = _decode_step(
            model, seqs[:, :, t].reshape(rows), t, cache[:, :, :rows], cross, cross_bias, groups, bias
        ).float()
        history, vocab = seqs.view(rows, -1)[:, :t + 1], logits.shape[-1]
        if beams == 1:  # HF's greedy search: the argmax of the processed logits, ties to the lowest id; a
            # running score added first would merge near ties once it is large (fp32 rounding)
            index = _ban(logits, history, t, settings, eos).argmax(-1, keepdim=True)
            top = scores  # greedy ranks no candidates: the score stays 0
        else:
            log_probs = _ban(F.log_softmax(logits, dim=-1), history, t, settings, eos)
            top, index = (
                (log_probs.view(-1, beams, vocab) + scores[:, :, None]).view(-1, beams * vocab).topk(width)
            )
        source, token = index // vocab, index % vocab
        candidates = _take(seqs, source)
        candidates[:, :, t + 1] = token
        ends = (token == eos) | (t + 1 >= steps)

        # beams that go on: the best num_beams candidates that did not end
        running = top + ends.to(torch.float32) * NEG
        keep = running.topk(beams)[1]
        seqs, scores, source = _take(candidates, keep), _take(running, keep), _take(source, keep)

        # finished hypotheses: ended among the top num_beams, normalised, merged with the kept ones
        just = ends & in_top_beams
        normed = top / ((t + 1) ** settings.length_penalty) + (~just) * NEG
        best = torch.cat([done_scores, normed], 1).topk(beams)[1]
        done_seqs = _take(torch.cat([done_seqs, candidates], 1), best)
        done_scores = _take(torch.cat([done_scores, normed], 1), best)
        done = _take(torch.cat([done, just], 1), best)

        finished = (done.all(1) | (t + 1 >= steps)).tolist()  # the step's one read on the host
        stay = everyone[:len(active)]
        if any(finished):
            ended = [b for b, f in enumerate(finished) if f]
            for b, ids in zip(ended, done_seqs[ended, 0, 1:].tolist()):
                results[active[b]] = until_eos(ids, eos)
            if len(ended) == len(active):
                break
            kept = [b for b, f in enumerate(finished) if not f]
            active, stay = [active[b] for b in kept], torch.tensor(kept, device=device)
            seqs, scores, source = seqs[stay], scores[stay], source[stay]
            done_seqs, done_scores, done = done_seqs[stay], done_scores[stay], done[stay]
            cross, cross_bias = cross[:, :, stay], cross_bias[stay]
            lengths = [lengths[b] for b in kept]
            groups = _groups(lengths)
        # the self-attention cache follows the beams (and drops finished dialogues): positions 0..t only
        parents = (stay[:, None] * beams + source).flatten()
        torch.index_select(cache[:, :, :, :, :t + 1], 2, parents, out=spare[:, :, :len(parents), :, :t + 1])
        cache, spare = spare, cache
    return results

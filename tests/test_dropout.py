import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import loss_curve
from dialsum_raw import dropout, lora
from dialsum_raw.modeling import load_model, set_dropout_impl

N = 10 ** 6


def _corr(a, b):
    return torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1].item()


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_keep_fraction_is_one_minus_p(p):
    """Mean of 10^6 mask bits within 4 standard errors of 1 - p."""
    torch.manual_seed(0)
    keep = dropout.keep_mask((N,), p)
    assert keep.dtype == torch.uint8 and set(keep.unique().tolist()) == {0, 1}
    assert abs(keep.double().mean().item() - (1 - p)) <= 4 * (p * (1 - p) / N) ** 0.5


def test_no_correlation_between_neighbours_lanes_or_calls():
    """|r| within 4 standard errors of 0 (1/sqrt(n)): neighbouring elements, the 4 lanes of one 64-bit
    draw (every pair), and two successive calls."""
    torch.manual_seed(0)
    first, second = dropout.keep_mask((N,), 0.1), dropout.keep_mask((N,), 0.1)
    lanes = first.view(-1, 4)
    pairs = [(first[:-1], first[1:]), (first, second)] + [(lanes[:, i], lanes[:, j])
                                                          for i in range(4) for j in range(i + 1, 4)]
    for a, b in pairs:
        assert abs(_corr(a, b)) <= 4 / len(a) ** 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_by_one_over_keep_and_gradients_only_through_kept(dtype):
    p = 0.25
    x = torch.randn(4096, dtype=dtype, requires_grad=True)
    y = dropout.dropout(x, p)
    kept = y != 0
    assert 0.7 < kept.float().mean() < 0.8
    assert torch.equal(y[kept], (x[kept] * (1 / (1 - p))).detach()) and not y[~kept].any()
    assert [t.dtype for t in y.grad_fn.saved_tensors] == [torch.uint8]  # the mask is saved, not the input
    g = torch.randn_like(x)
    y.backward(g)
    assert torch.equal(x.grad, torch.where(kept, g * (1 / (1 - p)), 0))  # the same mask, not a redrawn one
    assert dropout.dropout(x, p, training=False) is x


def test_same_seed_same_masks_and_the_saved_rng_state_replays_them():
    torch.manual_seed(3)
    a = dropout.keep_mask((1000,), 0.1)
    state = torch.get_rng_state()
    b = dropout.keep_mask((1000,), 0.1)
    torch.manual_seed(3)
    assert torch.equal(dropout.keep_mask((1000,), 0.1), a)
    torch.set_rng_state(state)
    assert torch.equal(dropout.keep_mask((1000,), 0.1), b) and not torch.equal(a, b)


class _Ops(TorchDispatchMode):
    """Names of the aten ops run inside it."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def _batch():
    g = torch.Generator().manual_seed(0)
    ids, dec = torch.randint(0, 100, (3, 20), generator=g), torch.randint(0, 100, (3, 7), generator=g)
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[0, 15:] = 0
    return dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)


def test_every_dropout_site_of_t5_and_lora_is_fast(tiny, monkeypatch):
    """A training step of T5 + LoRA with `fast` draws no bernoulli mask (torch's draws them); each attention
    layer draws its probability mask; eval logits equal torch's bit for bit."""
    models = {}
    for impl in ("torch", "fast"):
        model = load_model(tiny, dropout=0.1)
        lora.inject(model, lora.LoRAConfig(("q", "v"), 4, 8, dropout=0.1))
        models[impl] = set_dropout_impl(model, impl).train()
        with _Ops() as ops:
            model(**_batch()).logits.sum().backward()
        assert ("bernoulli_" in ops.names, "random_" in ops.names) == (impl == "torch", impl == "fast")
    assert all(
        type(m) is dropout.Dropout for m in models["fast"].modules() if isinstance(m, torch.nn.Dropout)
    )
    layers = sum(type(m).__name__ == "T5Attention" for m in models["fast"].modules())
    drawn, real = [], dropout.keep_mask
    monkeypatch.setattr(dropout, "keep_mask", lambda shape, p, device=None: (drawn.append(len(shape)),
                                                                              real(shape, p, device))[1])
    models["fast"](**_batch())
    assert drawn.count(4) == layers  # (batch, heads, query, key): one per attention layer
    with torch.no_grad():
        logits = [m.eval()(**_batch()).logits for m in models.values()]
    assert torch.equal(*logits)


def test_fast_attention_in_training_is_hfs_attention(tiny):
    """With p so small that every element is kept (p < 1/131,072), a training forward through the fast path
    (its own scores, bias, padding and causal masks, fp32 softmax) equals HF's sdpa in eval mode."""
    torch.manual_seed(0)
    fast = set_dropout_impl(load_model(tiny, dropout=1e-6), "fast").train()
    hf = load_model(tiny, dropout=0.0).eval()
    assert (fast(**_batch()).logits - hf(**_batch()).logits).abs().max() <= 1e-5


@pytest.mark.slow
def test_fast_trains_like_torch(tiny, tmp_path, reference_curve):
    """40 steps from one seed, dropout 0.1 (conftest.loss_curve): fast and torch dropout agree within 3% at
    every logged step, both fall, and the masks really differ (the curves are not identical)."""
    torch_ = loss_curve(tiny, tmp_path / "torch", dropout_impl="torch")
    fast = reference_curve()[0]
    assert len(torch_) == len(fast) == 8 and torch_ != fast
    assert all(abs(a - b) <= 0.03 * a for a, b in zip(torch_, fast)), list(zip(torch_, fast))
    assert torch_[-1] < torch_[0] * 0.9 and fast[-1] < fast[0] * 0.9

import warnings

import torch

from dialsum_raw import lora
from dialsum_raw.modeling import load_model


def _loss_and_lora_grads(path, checkpointing):
    """One fp32 forward/backward of LoRA (r=8 on q,v, non-zero B) with dropout on; counts how often the
    first encoder block's attention ran, which a checkpointed backward does twice."""
    torch.manual_seed(0)
    model = load_model(path, dropout=0.1)
    lora.inject(model, lora.LoRAConfig(("q", "v"), 8, 16))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    runs = []
    model.encoder.block[0].layer[0].register_forward_hook(lambda *a: runs.append(1))
    if checkpointing:  # the call training.py makes for --gradient-checkpointing
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore", FutureWarning
            )  # transformers 5 renamed it activation_checkpointing_enable
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    g = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(5, 30000, (4, 40), generator=g), torch.randint(5, 30000, (4, 12), generator=g)
    torch.manual_seed(5)
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, len(runs)


def test_gradient_checkpointing_keeps_loss_and_lora_grads(tiny):
    """T5's own checkpointing, non-reentrant: the backward recomputes each block with the same dropout
    masks, so the loss and every LoRA gradient are those of the plain run."""
    loss, grads, runs = _loss_and_lora_grads(tiny, checkpointing=False)
    loss_gc, grads_gc, runs_gc = _loss_and_lora_grads(tiny, checkpointing=True)
    assert (runs, runs_gc) == (1, 2)  # it did recompute
    assert abs(loss - loss_gc) <= 1e-6
    assert list(grads) == list(grads_gc) and len(grads) == 24
    for name in grads:
        assert grads[name].abs().max() > 0
        torch.testing.assert_close(grads_gc[name], grads[name], rtol=1e-5, atol=1e-7)

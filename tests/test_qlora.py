"""--base-dtype: a base stored in nf4 or bf16, loaded tensor by tensor, and LoRA on it (QLoRA)."""

import json
import os
import weakref

import pytest
import torch

from dialsum_raw import lora
from dialsum_raw.config import Settings, validate
from dialsum_raw.errors import UserError
from dialsum_raw.lora import LoRAConfig
from dialsum_raw.lora import main as lora_cli
from dialsum_raw.modeling import (check_base_precision, count_parameters, load_model, load_tokenizer,
                                  quantized_names)
from dialsum_raw.quant import NF4Linear, quantize, quantized_linears


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 1000, (2, 12), generator=g),
            "decoder_input_ids": torch.randint(0, 1000, (2, 5), generator=g)}


def test_nf4_model_is_the_fp32_model_with_its_block_weights_quantized(tiny):
    fp32, nf4 = load_model(tiny), load_model(tiny, base_dtype="nf4")
    names = quantized_names(fp32)
    assert {n for n, _ in quantized_linears(nf4)} == names
    assert {n.rsplit(".", 1)[-1] for n in names} == {"q", "k", "v", "o", "wi_0", "wi_1", "wo"}
    dense = dict(nf4.named_parameters())  # embeddings, lm_head, norms, position bias: fp32, the same values
    assert dense.keys() == {n for n, _ in fp32.named_parameters() if n.rsplit(".", 1)[0] not in names}
    assert all(p.dtype == torch.float32 and torch.equal(p, fp32.get_parameter(n)) for n, p in dense.items())
    assert (nf4.lm_head.weight is nf4.shared.weight) == (fp32.lm_head.weight is fp32.shared.weight)
    assert nf4.encoder.embed_tokens.weight is nf4.shared.weight
    assert not nf4.training
    assert (
        count_parameters(nf4)[1] == count_parameters(fp32)[1]
    )  # the 4-bit weights count as the parameters they are
    with torch.no_grad():
        for n in names:
            fp32.get_submodule(n).weight.copy_(quantize(fp32.get_submodule(n).weight).dequantize())
        assert torch.equal(nf4(**batch()).logits, fp32(**batch()).logits)


def test_nf4_under_bf16_compute_is_the_bf16_model_with_its_block_weights_quantized(tiny):
    """Under bf16 compute the rest is stored as the bf16 base stores it (a bf16 residual stream), the codes
    are the fp32 file's, and under autocast it computes what the bf16 base computes with each block weight
    replaced by its dequantized value."""
    bf16, nf4 = load_model(tiny, base_dtype="bf16"), load_model(tiny, base_dtype="nf4", compute="bf16")
    dense = dict(nf4.named_parameters())
    assert len(dense) > 10 and all(
        p.dtype == torch.bfloat16 and torch.equal(p, bf16.get_parameter(n)) for n, p in dense.items()
    )
    codes = dict(quantized_linears(load_model(tiny, base_dtype="nf4")))
    for name, m in quantized_linears(nf4):
        assert m.weight.dtype == torch.bfloat16  # T5's feed-forward casts wo's input to it
        assert all(torch.equal(x, y) for x, y in zip(m.buffers(), codes[name].buffers()))
    with torch.no_grad():
        for name, m in quantized_linears(nf4):
            bf16.get_submodule(name).weight.copy_(m.dequantize(torch.bfloat16))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(nf4(**batch()).logits, bf16(**batch()).logits)


@pytest.mark.slow
def test_every_command_loads_nf4_in_its_compute_dtype(tiny, tmp_path, monkeypatch):
    """train, evaluate and summarize under --precision bf16 hand load_model their compute dtype, so an nf4
    base's rest is bf16 there; under fp32, fp32."""
    from conftest import CORPUS

    from dialsum_raw import compare, modeling, summarize, training
    from dialsum_raw.config import EVALUATE, build_parser, settings_from
    seen = []

    def recording(name, *args, **kwargs):
        model = load_model(name, *args, **kwargs)
        seen.append(model.shared.weight.dtype)
        return model
    for module in (modeling, compare, training):
        monkeypatch.setattr(module, "load_model", recording)
    model = nf4_lora(tiny, LoRAConfig(("q", "v"), 4, 8, base_dtype="nf4"))
    lora.save_adapter(model, tmp_path / "ad", base_model=tiny)
    text = tmp_path / "chat.txt"
    text.write_text("#Person1#: Lunch at noon?\n#Person2#: Sure.\n")
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        seen.clear()
        common = ["--precision", precision, "--max-new-tokens", "4"]
        summarize.main(["--model", tiny, "--adapter", str(tmp_path / "ad"), *common, str(text)])
        compare.run(settings_from(build_parser(EVALUATE, "").parse_args(
            ["--base", tiny, "--adapter", str(tmp_path / "ad"), "--data", CORPUS, "--limit", "1",
             "--output-dir", str(tmp_path / f"eval-{precision}"), *common])))
        settings = Settings(model=tiny, data=CORPUS, output_dir=str(tmp_path / f"run-{precision}"),
                            lora_rank=4, base_dtype="nf4", precision=precision, max_steps=1, subsample=200,
                            max_source_len=64, max_target_len=16, eval_every=100)
        validate(settings)
        training.train(settings)
        assert seen == [dtype] * 3


def test_nf4_loading_hands_freed_buffers_back(tiny, monkeypatch):
    """load_model maps large buffers while nf4 loads (test_freed_weight_sized_buffers_go_back_to_the_system
    shows what that does), from before the first weight is read, and serves them from the heap again after
    the last (so the steps' activations do not page-fault)."""
    from dialsum_raw import modeling
    calls = []
    monkeypatch.setattr(modeling, "mmap_large_buffers", calls.append)
    real = modeling.read_safetensors

    def reading(*args):
        calls.append("read")
        return real(*args)
    monkeypatch.setattr(modeling, "read_safetensors", reading)
    load_model(tiny, base_dtype="nf4")
    assert calls == [True, "read", False]


@pytest.mark.slow
def test_a_checkpointing_run_maps_large_buffers_for_its_steps(tiny, tmp_path, monkeypatch):
    """--gradient-checkpointing trades time for memory, and so does the allocator setting: with it the
    setting goes on again once the model is loaded (the nf4 loader's on-off pair before), without it it stays
    off for the steps."""
    from conftest import CORPUS

    from dialsum_raw import modeling, training
    calls = []
    monkeypatch.setattr(modeling, "mmap_large_buffers", lambda on: calls.append(("load", on)))
    monkeypatch.setattr(training, "mmap_large_buffers", lambda on: calls.append(("steps", on)))
    for checkpointing in (False, True):
        calls.clear()
        settings = Settings(model=tiny, data=CORPUS, output_dir=str(tmp_path / str(checkpointing)),
                            lora_rank=4, base_dtype="nf4", max_steps=1, subsample=200, max_source_len=64,
                            max_target_len=16, eval_every=100, gradient_checkpointing=checkpointing,
                            precision="fp32")
        validate(settings)
        training.train(settings)
        assert calls == [("load", True), ("load", False), *([("steps", True)] if checkpointing else [])]


def test_scratch_dequantize_is_the_weight_in_one_kept_buffer_per_size():
    """NF4Linear's matmul dequantizes into buffers kept per size (made once, not hundreds of times a step):
    the same values as a fresh dequantize, in the same memory for every weight of that size."""
    g = torch.Generator().manual_seed(0)
    a, b = (quantize(torch.randn(128, 64, generator=g)) for _ in range(2))
    for dtype in (torch.float32, torch.bfloat16):
        fresh = a.dequantize(dtype)
        kept = a.dequantize(dtype, scratch=True)
        assert kept.dtype == dtype and torch.equal(kept, fresh)
        assert torch.equal(b.dequantize(dtype, scratch=True), b.dequantize(dtype))
        assert b.dequantize(dtype, scratch=True).data_ptr() == kept.data_ptr()
        assert a.dequantize(dtype).data_ptr() != kept.data_ptr()


def test_nf4_loading_is_deterministic_bit_for_bit(tiny):
    a, b = (dict(quantized_linears(load_model(tiny, base_dtype="nf4"))) for _ in range(2))
    assert all(torch.equal(x, y) for n in a for x, y in zip(a[n].buffers(), b[n].buffers()))


def test_bf16_base_stores_every_weight_in_bf16(tiny):
    model = load_model(tiny, base_dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_refusals_in_one_line(tiny, tmp_path):
    with pytest.raises(UserError, match="--lora-rank 0"):
        validate(Settings(lora_rank=0, base_dtype="nf4"))
    with pytest.raises(UserError, match="--fsdp"):
        validate(Settings(fsdp=True, base_dtype="nf4"))
    with pytest.raises(UserError, match="--base-dtype must be one of"):
        validate(Settings(base_dtype="int4"))
    with pytest.raises(UserError, match="needs bf16 compute"):
        check_base_precision("bf16", "fp32")
    check_base_precision("nf4", "fp32")  # dequantizes to fp32
    folder = tmp_path / "bin"
    folder.mkdir()
    for name in os.listdir(tiny):
        if name != "model.safetensors":
            (folder / name).write_bytes((open(os.path.join(tiny, name), "rb")).read())
    with pytest.raises(UserError, match="reads safetensors weights"):
        load_model(str(folder), base_dtype="nf4")


def test_nf4_loading_never_holds_more_than_two_fp32_block_weights(tiny, monkeypatch):
    """Each block weight is read, quantized and dropped: when a tensor is read, no block weight read before
    the previous one is still alive (the loop variable holds the previous one until the next arrives)."""
    from dialsum_raw import modeling
    read, seen, targets = modeling.read_safetensors, [], quantized_names(load_model(tiny))

    def watched(paths):
        for path, key, tensor in read(paths):
            alive = [k for k, ref in seen[:-1] if ref() is not None]
            assert not alive, f"{alive[0]} still held when {key} is read"
            if key.rsplit(".", 1)[0] in targets:
                seen.append((key, weakref.ref(tensor)))
            yield path, key, tensor
            del tensor

    monkeypatch.setattr(modeling, "read_safetensors", watched)
    model = load_model(tiny, base_dtype="nf4")
    assert len(seen) == len(quantized_linears(model)) > 2


# ---------------------------------------------------------------- LoRA on a 4-bit base

def nf4_lora(tiny, cfg):
    model = load_model(tiny, base_dtype="nf4").eval()
    lora.inject(model, cfg)
    return model


@pytest.mark.parametrize("variant,init", [("lora", "kaiming"), ("dora", "kaiming"), ("vera", "kaiming"),
                                          ("lora", "mica"), ("lora", "gaussian")])
def test_every_variant_starts_equal_to_its_nf4_base_and_trains(tiny, variant, init):
    """Fresh layers leave the quantized model's output as it was (residual inits: the next test); a bf16 step
    reaches every trainable tensor, all fp32, and the base stays 4-bit."""
    cfg = LoRAConfig(("q", "v", "wo"), 4, 8, variant=variant, init=init, vera_rank=8, base_dtype="nf4")
    model, plain = nf4_lora(tiny, cfg), load_model(tiny, base_dtype="nf4").eval()
    with torch.no_grad():
        start, base = model(**batch()).logits, plain(**batch()).logits
    assert (start - base).abs().max() < 1e-5
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(**batch(), labels=batch()["decoder_input_ids"]).loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for _, p in trainable)  # B = 0 at the start: A's is 0
    assert sum(p.grad.abs().sum() for _, p in trainable) > 0
    assert all(p.dtype == torch.float32 for _, p in trainable)
    assert all(isinstance(m.base, NF4Linear) for _, m in lora.lora_layers(model))


@pytest.mark.parametrize("variant,init", [("lora", "pissa"), ("lora", "olora"), ("dora", "pissa")])
def test_residual_init_quantizes_the_residual_of_the_original_weight(tiny, variant, init):
    """PiSSA/OLoRA decompose the original fp32 W and the base stores nf4(W - s B0 A0) (peft #1999 kept
    nf4(W)): the layer starts out as deq(nf4(W - s B0 A0)) + s B0 A0, computed here on the fp32 model (whose
    other block weights are deq(nf4(W)), as the nf4 model's)."""
    cfg = LoRAConfig(("q", "v", "wo"), 4, 8, variant=variant, init=init, base_dtype="nf4")
    model, ref = nf4_lora(tiny, cfg), load_model(tiny).eval()
    with torch.no_grad():
        for name in quantized_names(ref):
            w = ref.get_submodule(name).weight
            w.copy_(quantize(w).dequantize())
        fp32 = load_model(tiny)
        for name, m in lora.lora_layers(model):
            w, original = ref.get_submodule(name).weight, fp32.get_submodule(name).weight
            low = m.scaling * m.lora_B0 @ m.lora_A0
            assert not torch.equal(m.base.codes, quantize(original).codes)
            assert torch.equal(m.base.codes, quantize(original - low).codes)
            w.copy_(quantize(original - low).dequantize() + low)
        assert (model(**batch()).logits - ref(**batch()).logits).abs().max() < 1e-5


def test_loftq_is_closer_to_the_fp32_model_than_nf4(tiny):
    """peft's test_t5_loftq: with LoftQ the quantized model's logits are closer to the fp32 model's than
    plain NF4's (B = 0), by at least 3% in both mean squared and mean absolute error."""
    targets = ("q", "k", "v", "o", "wi_0", "wi_1", "wo")
    ids = {"input_ids": torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0)),
           "decoder_input_ids": torch.randint(0, 1000, (4, 8), generator=torch.Generator().manual_seed(1))}
    with torch.no_grad():
        fp32 = load_model(tiny).eval()(**ids).logits
        errors = {}
        for init in ("kaiming", "loftq"):
            out = nf4_lora(tiny, LoRAConfig(targets, 8, 8, init=init, base_dtype="nf4"))(**ids).logits
            errors[init] = ((out - fp32).pow(2).mean().item(), (out - fp32).abs().mean().item())
    (mse_nf4, mae_nf4), (mse_loftq, mae_loftq) = errors["kaiming"], errors["loftq"]
    assert mse_loftq <= 0.97 * mse_nf4 and mae_loftq <= 0.97 * mae_nf4, errors


@pytest.mark.parametrize("init", ["kaiming", "pissa", "loftq"])
def test_saved_qlora_adapter_reloads_bit_for_bit(tiny, tmp_path, init):
    """The adapter records its base dtype; loading quantizes the base again and gives the same logits, bit for
    bit. LoftQ's base is computed again: after 2 iterations it is nf4(W - s B1 A1), not nf4(W)."""
    model = nf4_lora(tiny, LoRAConfig(("q", "v"), 4, 8, init=init, base_dtype="nf4", loftq_iter=2))
    if init == "loftq":
        name, layer = lora.lora_layers(model)[0]
        assert not torch.equal(layer.base.codes, quantize(load_model(tiny).get_submodule(name).weight).codes)
    with torch.no_grad():
        for _, m in lora.lora_layers(model):
            m.lora_B.add_(0.05)
        expected = model(**batch()).logits
    lora.save_adapter(model, tmp_path / "ad", base_model=tiny)
    assert json.loads((tmp_path / "ad" / "adapter.json").read_text())["base_dtype"] == "nf4"
    again = load_model(tiny, base_dtype="nf4").eval()
    lora.load_adapter(again, tmp_path / "ad")
    with torch.no_grad():
        assert torch.equal(again(**batch()).logits, expected)


def test_merge_writes_fp32_and_never_requantizes(tiny, tmp_path, capsys):
    model = nf4_lora(tiny, LoRAConfig(("q", "v", "wo"), 4, 8, variant="dora", base_dtype="nf4"))
    with torch.no_grad():
        for _, m in lora.lora_layers(model):
            m.lora_B.add_(0.05)
        expected = model(**batch()).logits
    with pytest.raises(UserError, match="does not merge into a 4-bit base"):
        lora.merge(model)
    lora.save_adapter(model, tmp_path / "ad", base_model=tiny)
    lora_cli(["merge", "--base", tiny, "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "merged")])
    assert (
        "fp32 weights; trained on an nf4 base: merged onto its dequantized weights" in capsys.readouterr().out
    )
    merged = load_model(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        assert (merged(**batch()).logits - expected).abs().max() < 1e-4
    lora_cli(["export-peft", "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "peft")])
    assert "trained on a quantized base, nf4 with double quantization" in capsys.readouterr().out


def test_summarize_on_a_qlora_adapter_gives_the_in_memory_models_summary(tiny, tmp_path, capsys):
    from dialsum_raw.config import SUMMARIZE, build_parser, settings_from
    from dialsum_raw.generation import summarize
    from dialsum_raw.summarize import main
    model = nf4_lora(tiny, LoRAConfig(("q", "v"), 4, 8, base_dtype="nf4"))
    with torch.no_grad():
        for _, m in lora.lora_layers(model):
            m.lora_B.add_(0.3)
    lora.save_adapter(model, tmp_path / "ad", base_model=tiny)
    text = tmp_path / "chat.txt"
    text.write_text("#Person1#: Lunch at noon?\n#Person2#: Sure, see you there.\n")
    argv = [
        "--model",
        tiny,
        "--adapter",
        str(tmp_path / "ad"),
        "--precision",
        "fp32",
        "--max-new-tokens",
        "12",
    ]
    settings = settings_from(build_parser(SUMMARIZE, "").parse_args(argv))
    settings.eval_batch_size = 1
    (expected,) = summarize(
        model, load_tokenizer(tiny), [text.read_text().strip()], settings, desc="in memory"
    )
    main([*argv, str(text)])
    assert capsys.readouterr().out.strip() == expected


@pytest.mark.peft
def test_qlora_logits_and_one_step_equal_peft_on_bitsandbytes(tiny):
    """peft 0.21.2 LoRA on q, v of a T5 that transformers loads with bitsandbytes' 4-bit NF4 (double
    quantization, fp32 compute) on CPU: after injection our logits equal peft's, and one AdamW step moves A
    and B alike (the issue asks for bf16 rounding; they agree to fp32 rounding, bit for bit on this machine).
    transformers keeps wo in fp32 under bitsandbytes (T5's _keep_in_fp32_modules), so ours gets the fp32 wo
    for this comparison. Both run in train mode with dropout 0: in eval mode on a CPU with AVX512-BF16
    bitsandbytes repacks the weight for a bf16 kernel."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSeq2SeqLM, BitsAndBytesConfig
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    torch.manual_seed(0)
    theirs = get_peft_model(
        AutoModelForSeq2SeqLM.from_pretrained(
            tiny, quantization_config=quant, device_map="cpu", dropout_rate=0.0
        ),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], lora_dropout=0.0),
    )
    ours = load_model(tiny, dropout=0.0, base_dtype="nf4")
    fp32 = load_model(tiny)
    for name in [n for n in quantized_names(fp32) if n.endswith(".wo")]:
        parent, child = name.rsplit(".", 1)
        setattr(ours.get_submodule(parent), child, fp32.get_submodule(name))
    lora.inject(ours, LoRAConfig(("q", "v"), 4, 8, base_dtype="nf4"))
    pairs = []
    with torch.no_grad():
        for name, m in lora.lora_layers(ours):
            peft_layer = theirs.base_model.model.get_submodule(name)
            peft_layer.lora_B["default"].weight.normal_(0, 0.1)  # B = 0 would hide a wrong base or scale
            m.lora_A.copy_(peft_layer.lora_A["default"].weight)
            m.lora_B.copy_(peft_layer.lora_B["default"].weight)
            pairs += [
                (m.lora_A, peft_layer.lora_A["default"].weight),
                (m.lora_B, peft_layer.lora_B["default"].weight),
            ]
    for model in (ours, theirs):
        model.train()
    b = batch()
    with torch.no_grad():
        logits = ours(**b).logits
        assert (logits - theirs(**b).logits).abs().max() <= 1e-6 * logits.abs().max()
    for model in (ours, theirs):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model(**b, labels=b["decoder_input_ids"]).loss.backward()
        opt.step()
    assert len(pairs) == 2 * 12
    for a, p in pairs:
        assert (a - p).abs().max() <= 1e-6 * 1e-2  # Adam's first step moves each by ~lr


FRAGMENTING = """
import sys, torch
from dialsum_raw.modeling import mmap_large_buffers
mmap_large_buffers(sys.argv[1] == "on")
kept, freed = [], []
for _ in range(40):  # layer calls: a weight-sized buffer, and a small tensor that stays made beside it
    for n in (1 << 20, 2_883_584, 1 << 20, 3 << 18):
        freed.append(torch.ones(n))
        kept.append(torch.ones(n // 64))
del freed  # each weight-sized buffer freed between two small tensors that stay
print(int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024)
"""


@pytest.mark.slow
def test_freed_weight_sized_buffers_go_back_to_the_system(tmp_path):
    """nf4 loading frees weight-sized buffers between small tensors that stay: served from the heap, as
    glibc's default dynamic threshold soon does and mmap_large_buffers(False) does after loading, the holes
    stay resident (880 MB here); mmap_large_buffers(True), which load_model sets while nf4 loads, hands them
    back. Each side in a fresh process. The buffers are freed together at the end: freed one at a time, a
    later one may reuse a hole or end at the heap's top and be trimmed, so what stays resident depended on
    the heap's layout at start (in 6 of 20 runs of that probe, nothing did)."""
    import subprocess
    import sys

    from conftest import ALLOCATOR, REPO
    plain = {k: v for k, v in os.environ.items() if k not in ALLOCATOR}  # glibc's defaults, as users run
    script = tmp_path / "fragmenting.py"
    script.write_text(FRAGMENTING)
    rss = {mode: int(subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True,
                                    check=True, cwd=REPO, env={**plain, "PYTHONPATH": REPO}).stdout)
           for mode in ("off", "on")}
    assert rss["on"] < rss["off"] - 200, rss


@pytest.mark.slow
def test_bench_block_and_step_time_the_three_bases_and_put_dequantize_back(tmp_path):
    """`bench block` and `bench step` on the tiny shape: a row per base dtype and batch shape, the ratios
    those rows' seconds give, nf4's dequantizing share measured (between 0 and 1) and NF4.dequantize itself
    again afterwards (the timer must not stay installed)."""
    from conftest import CORPUS, FLAN

    from dialsum_raw import bench, quant
    original = quant.NF4.dequantize
    threads = torch.get_num_threads()
    try:
        bench.main(["block", "--size", "tiny", "--repeat", "1", "--config", FLAN, "--out", str(tmp_path)])
        data = tmp_path / "data"  # 80 training dialogues: every 10th is the one batch of 8 the step takes
        data.mkdir()
        for split, n in (("train", 80), ("dev", 8)):
            with open(os.path.join(CORPUS, f"dialogsum.{split}.jsonl")) as f:
                (data / f"dialogsum.{split}.jsonl").write_text("".join(next(f) for _ in range(n)))
        bench.main(["step", "--size", "tiny", "--repeat", "1", "--config", FLAN, "--data", str(data),
                    "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    block, step = (json.load(open(tmp_path / f"bench-{name}.json")) for name in ("block", "step"))
    assert block["size"] == step["size"] == "tiny" and set(block["shapes"]) == {"8x320", "1x512"}
    (shape,) = step["shapes"]
    assert shape.startswith("8x") and "+" in shape  # the memory probe's batch: 8 dialogues
    for r in [*block["shapes"].values(), *step["shapes"].values()]:
        assert set(r["seconds"]) == {"fp32", "bf16", "nf4"} and all(v > 0 for v in r["seconds"].values())
        assert r["nf4_over_bf16"] == r["seconds"]["nf4"] / r["seconds"]["bf16"]
        assert 0 < r["dequantize_share"] < 1
    assert quant.NF4.dequantize is original

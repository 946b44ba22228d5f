import subprocess
import sys

import pytest

from conftest import FLAN, REPO


@pytest.mark.slow
def test_standin_command_writes_a_loadable_model(tmp_path):
    out = tmp_path / "tiny"
    res = subprocess.run(
        [sys.executable, "-m", "dialsum_raw.standin", "--config", FLAN, "--out", str(out), "--tiny"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    assert res.stdout.strip() == f"wrote {out}: 4,310,016 parameters"
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
    model = AutoModelForSeq2SeqLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.d_model == 64 and tok("Hello")["input_ids"][-1] == tok.eos_token_id
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    assert not (tmp_path / "tiny.tmp").exists()


@pytest.mark.slow
def test_standin_without_config_is_a_clear_error(tmp_path):
    res = subprocess.run([sys.executable, "-m", "dialsum_raw.standin", "--config", str(tmp_path), "--out",
                          str(tmp_path / "x")], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 2 and res.stderr.strip().startswith(f"error: {tmp_path}: no config.json")


# published google/flan-t5-{small,base,large}: d_model, d_ff, heads, layers; parameters with a separate
# lm_head; LoRA r=8 on q,v trainable parameters: 8 x (d_model + heads x d_kv) per layer, q and v in the
# encoder's
# self-attention and the decoder's self- and cross-attention
SHAPES = {"small": (512, 1024, 6, 8, 76_961_152, 344_064), "base": (768, 2048, 12, 12, 247_577_856, 884_736),
          "large": (1024, 2816, 16, 24, 783_150_080, 2_359_296)}


def test_sizes_have_flan_t5_shapes_and_parameter_counts():
    from dialsum_raw import lora, standin
    from dialsum_raw.modeling import count_parameters
    for size, (d_model, d_ff, heads, layers, total, trainable) in SHAPES.items():
        model = standin.skeleton(FLAN, size)  # shapes only: no memory, no init time
        c = model.config
        assert (c.d_model, c.d_ff, c.num_heads, c.num_layers, c.num_decoder_layers) == (
            d_model,
            d_ff,
            heads,
            layers,
            layers,
        )
        assert (c.d_kv, c.vocab_size, c.feed_forward_proj) == (64, 32128, "gated-gelu")
        assert model.lm_head.weight is not model.shared.weight
        assert count_parameters(model)[1] == total
        lora.inject(model, lora.LoRAConfig(("q", "v"), 8, 16))
        assert count_parameters(model)[0] == trainable == 8 * (d_model + heads * 64) * 2 * 3 * layers


@pytest.mark.slow
def test_size_and_tiny_exclude_each_other(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "dialsum_raw.standin",
            "--config",
            FLAN,
            "--out",
            str(tmp_path / "x"),
            "--tiny",
            "--size",
            "base",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert res.returncode == 2 and "not allowed with argument" in res.stderr


@pytest.mark.slow
def test_xl_is_counted_on_the_meta_device_with_predicted_memory(tmp_path):
    """flan-t5-xl (published: 2,849,757,184 parameters with its own lm_head) is built without weights;
    the prediction is 16 bytes per parameter on each DDP process and 16/N under --fsdp."""
    res = subprocess.run([sys.executable, "-m", "dialsum_raw.standin", "--config", FLAN, "--size", "xl"],
                         capture_output=True, text=True, cwd=REPO, check=True)
    lines = res.stdout.splitlines()
    assert (
        lines[0] == "flan-t5-xl shape: 2,849,757,184 parameters (built on the meta device; nothing written)"
    )
    gb = 16 * 2_849_757_184 / 1e9
    assert lines[2] == f"  DDP, any number of processes: {gb:.1f} GB"
    assert lines[3] == f"  --fsdp: N=2: {gb / 2:.1f} GB, N=4: {gb / 4:.1f} GB, N=8: {gb / 8:.1f} GB"


def test_a_sharded_build_writes_one_shard_at_a_time_deterministically(tmp_path):
    """build() fills, saves and drops a shard at a time (how xl and xxl are written here), with T5's
    init scales, deterministically for a seed, read back by from_pretrained and by the nf4 loader."""
    import json

    import torch
    from transformers import AutoModelForSeq2SeqLM

    from dialsum_raw import standin
    from dialsum_raw.modeling import load_model
    out = standin.build(FLAN, str(tmp_path / "sharded"), tiny=True, seed=3, shard_bytes=2 ** 20)
    with open(tmp_path / "sharded" / "model.safetensors.index.json") as f:
        files = set(json.load(f)["weight_map"].values())
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) == 3 and files == set(shards) and shards[-1].endswith("-of-00003.safetensors")
    for p in (tmp_path / "sharded").glob("model-*.safetensors"):  # no shard beyond its bound but by one piece
        assert p.stat().st_size < 2 ** 20 + 32128 * 64 * 4 + 2 ** 16
    expected = AutoModelForSeq2SeqLM.from_pretrained(out).state_dict()
    again = standin.build(FLAN, str(tmp_path / "again"), tiny=True, seed=3, shard_bytes=2 ** 20)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(again).state_dict()
    assert loaded.keys() == standin.random_model(FLAN, "tiny").state_dict().keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert standin.written_parameters(out) == 4_310_016
    assert not any(t.is_meta for t in load_model(out, base_dtype="nf4").state_dict().values())
    stds = {  # T5's init (d_model 64, d_kv 16, d_ff 128); lm_head N(0, d_model^-0.5)
        "shared.weight": 1.0, "lm_head.weight": 64 ** -0.5,
        "encoder.block.0.layer.0.SelfAttention.q.weight": (64 * 16) ** -0.5,
        "decoder.block.1.layer.1.EncDecAttention.v.weight": 64 ** -0.5,
        "encoder.block.1.layer.1.DenseReluDense.wo.weight": 128 ** -0.5,
    }
    for name, std in stds.items():
        assert abs(expected[name].std().item() / std - 1) < 0.1, name
    assert torch.equal(expected["decoder.final_layer_norm.weight"], torch.ones(64))
    other = AutoModelForSeq2SeqLM.from_pretrained(
        standin.build(FLAN, str(tmp_path / "other"), tiny=True, seed=4, shard_bytes=2 ** 20)).state_dict()
    assert not torch.equal(other["encoder.block.0.layer.0.SelfAttention.q.weight"],
                           expected["encoder.block.0.layer.0.SelfAttention.q.weight"])

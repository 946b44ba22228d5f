"""The precision rule (auto, bf16, fp32; fp16 refused) and bf16 training on CPU tracking fp32."""

import json
from contextlib import nullcontext

import pytest
import torch

from conftest import loss_curve
from dialsum_raw import modeling
from dialsum_raw.config import Settings, validate
from dialsum_raw.errors import UserError

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: on a busy shared CPU two threads wait on each other and run several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("units, auto", [("", "fp32"), ("AVX512-BF16", "bf16"), ("AMX-BF16", "bf16")])
def test_auto_is_bf16_only_on_a_cpu_that_multiplies_bf16(monkeypatch, units, auto):
    monkeypatch.setattr(modeling, "cpu_bf16_units", lambda: units)
    name, why = modeling.choose_precision("auto", CPU)
    assert name == auto and why.startswith("auto: ") and units in why
    assert modeling.choose_precision("bf16", CPU)[0] == "bf16"  # asked for: runs, emulated if need be
    assert modeling.choose_precision("fp32", CPU) == ("fp32", "--precision fp32")
    with modeling.autocast_for("auto", CPU)():
        assert torch.is_autocast_enabled("cpu") == (auto == "bf16")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert modeling.autocast_for("fp32", CPU) is nullcontext


@pytest.mark.parametrize(
    "capability, auto", [((7, 0), "fp32"), ((7, 5), "fp32"), ((8, 0), "bf16"), ((9, 0), "bf16")]
)
def test_bf16_on_cuda_is_native_from_ampere_and_warned_before(monkeypatch, capability, auto):
    """The rule of the CPU, on a GPU: auto takes bf16 only from compute capability 8.0 (Ampere); an older
    GPU still runs --precision bf16, emulated, and the reason the run logs says so (torch.cuda faked)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    name, why = modeling.choose_precision("auto", CUDA)
    assert name == auto and f"compute capability {capability[0]}.{capability[1]}" in why
    name, why = modeling.choose_precision("bf16", CUDA)
    assert name == "bf16" and ("emulated" in why and "likely slower than fp32" in why) == (auto == "fp32")
    assert modeling.choose_precision("fp32", CUDA)[0] == "fp32"


def test_the_probe_reads_torch_and_fp16_is_refused():
    caps = torch._C._cpu._get_cpu_capability()
    assert bool(modeling.cpu_bf16_units()) == bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))
    for name in ("fp16", "float16", "half"):
        with pytest.raises(UserError, match="fp16 is refused"):
            modeling.choose_precision(name, CPU)
        with pytest.raises(UserError, match="fp16 is refused"):
            validate(Settings(precision=name))
    with pytest.raises(UserError, match="auto, bf16 or fp32"):
        modeling.choose_precision("bf15", CPU)


@pytest.mark.slow
def test_bf16_trains_like_fp32(tiny, tmp_path, reference_curve):
    """40 steps of the tiny model from the same seed (conftest.loss_curve): bf16 autocast tracks fp32 within
    3% at every logged step, both fall, and bf16 really ran (the curves are not identical)."""
    bf16 = loss_curve(tiny, tmp_path / "bf16", precision="bf16")
    fp32, fp32_run = reference_curve()
    for run, precision in ((tmp_path / "bf16", "bf16"), (fp32_run, "fp32")):  # what summary.json records
        assert json.loads((run / "summary.json").read_text())["precision"] == precision
    assert len(fp32) == len(bf16) == 8
    gaps = [abs(b - a) / a for a, b in zip(fp32, bf16)]
    assert max(gaps) <= 0.03, gaps
    assert max(gaps) > 0, "bf16 and fp32 gave identical losses: autocast did not run"
    for curve in (fp32, bf16):
        assert curve[-1] < 0.8 * curve[0], curve

import os

import pytest

# The suite runs on CPU, GPU machine or not (the 2-process tests mean gloo): set before CUDA starts, and
# inherited by every test subprocess (train.py, torchrun's workers). GPU checks belong to the GPU bench.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
# Tiny models: a second thread costs more in synchronisation than it saves, and the 2-process tests would
# put four threads on two cores. Test subprocesses inherit this; tests that need more threads say so.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("DIALSUM_SHARED", os.path.join(os.path.dirname(REPO), "shared"))
CORPUS = os.path.join(SHARED, "dialogsum")
FLAN = os.path.join(SHARED, "flan-t5-small")


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which turns -n into workers
def pytest_cmdline_main(config):
    """Two xdist workers unless the command line says how many: here rather than in setup.cfg's addopts, so
    that `-p no:xdist` still parses. --dist loadfile unless told otherwise keeps a module on one worker (its
    module fixtures built once); `-n 0` runs everything in this process."""
    if not config.pluginmanager.hasplugin("xdist") or hasattr(config, "workerinput") or config.option.usepdb:
        return
    if config.option.numprocesses is None and not config.option.tx:
        config.option.numprocesses, config.option.tx = 2, ["popen"] * 2
    if config.option.numprocesses and config.option.dist == "no":
        config.option.dist = "loadfile"


def pytest_collection_modifyitems(items):
    """A test that uses the `trained` fixture is slow (two training runs, once per session and worker)."""
    for item in items:
        if "trained" in getattr(item, "fixturenames", ()):
            item.add_marker("slow")


def randomize_adapter(model, seed=1):
    """Every tensor each adapter layer declares trainable (trainable(cfg)) moved off its start by 10% of its mean
    size (0.1 where it is zero: B, MiCA's A, VeRA's λ_b), so each one changes the output and a tensor that is not
    saved, loaded or merged shows."""
    import torch
    from dialsum_raw import lora
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora.lora_layers(model):
            for name in sorted(type(m).trainable(m.cfg)):
                t = getattr(m, name)
                t.add_(torch.randn(t.shape, generator=g).to(t.dtype) * 0.1 * (t.abs().mean().item() or 1.0))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny random T5 with flan-t5-small's tokenizer (fast tests)."""
    from dialsum_raw.standin import build
    return build(FLAN, str(tmp_path_factory.mktemp("models") / "tiny"), tiny=True)


@pytest.fixture(scope="session")
def small(tmp_path_factory):
    """flan-t5-small's exact architecture with random weights."""
    from dialsum_raw.standin import build
    return build(FLAN, str(tmp_path_factory.mktemp("models") / "small"))


@pytest.fixture(scope="session")
def tokenizer():
    from dialsum_raw.modeling import load_tokenizer
    return load_tokenizer(FLAN)


@pytest.fixture(scope="session")
def corpus():
    from dialsum_raw.data import load_splits
    return load_splits(CORPUS)


@pytest.fixture(scope="session")
def trained(tiny, tmp_path_factory):
    """A briefly trained tiny model (full) and LoRA adapter: they emit EOS, unlike random weights."""
    import subprocess
    import sys
    root = tmp_path_factory.mktemp("trained")
    procs = {name: subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), "--config",
                                     os.path.join(REPO, "configs", "tiny-smoke.toml"), "--model", tiny, "--data", CORPUS,
                                     "--output-dir", str(root / name), "--max-steps", "50", "--eval-every", "50", *flags],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for name, flags in (("full", ["--lora-rank", "0", "--lr", "3e-3"]),
                                 ("lora", ["--lora-rank", "8", "--lr", "1e-2"]))}  # side by side: one core each
    for name, proc in procs.items():
        err = proc.communicate()[1]
        assert proc.returncode == 0, err.decode()[-2000:]
    return {name: str(root / name / "best") for name in procs}

import os

import pytest
import zygote

# The suite runs on CPU, GPU machine or not (the 2-process tests mean gloo): set before CUDA starts, and
# inherited by every test subprocess (train.py, torchrun's workers). GPU checks belong to the GPU bench.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
# Tiny models: a second thread costs more in synchronisation than it saves, and the 2-process tests would
# put four threads on two cores. Test subprocesses inherit this; tests that need more threads say so.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# glibc gives every buffer over its mmap threshold (at most 32 MiB by default) its own mapping and unmaps it
# when freed, so each step page-faults its large activations in again (the tiny model's 32k-word logits): a
# fifth of a tiny run's CPU time, all of it system time. The suite's processes (xdist's workers, the zygote
# and every command) keep such buffers in the heap instead. Read by glibc when a process starts: set here, in
# pytest's first process, before it starts any. It changes no result, only where memory comes from; the one
# test of the allocator (test_qlora's fragmenting test) runs without it.
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(512 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
os.environ.update(ALLOCATOR)
# The tokenizer's batch calls on one thread: its own threads would take the other worker's core, and cost
# a fifth more CPU time for the whole corpus than one thread does.
os.environ["TOKENIZERS_PARALLELISM"] = "false"

# Eligible test commands (train.py, evaluate.py, python -m dialsum_raw.X) are forked from a process that has
# imported torch, transformers and dialsum_raw once (tests/zygote.py); `real_processes` tests are fork + exec.
zygote.install()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("DIALSUM_SHARED", os.path.join(os.path.dirname(REPO), "shared"))
CORPUS = os.path.join(SHARED, "dialogsum")
FLAN = os.path.join(SHARED, "flan-t5-small")


@pytest.fixture(autouse=True)
def _real_processes(request):
    """Under the `real_processes` marker, every command the test starts is a real fork + exec."""
    if request.node.get_closest_marker("real_processes") is None:
        yield
        return
    with zygote.real_processes():
        yield


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which turns -n into workers
def pytest_cmdline_main(config):
    """Two xdist workers unless the command line says how many: here rather than in setup.cfg's addopts, so
    that `-p no:xdist` still parses; `-n 0` runs everything in this process. Unless --dist is given, the work
    is dealt in the units and the order pytest_collection_modifyitems gives (--dist loadgroup)."""
    if hasattr(
        config, "workerinput"
    ):  # a worker parses only the command line: it learns --dist from its input
        config.option.loadgroup = config.workerinput.get("dist") == "loadgroup"
        return
    if not config.pluginmanager.hasplugin("xdist") or config.option.usepdb:
        return
    if config.option.numprocesses is None and not config.option.tx:
        config.option.numprocesses, config.option.tx = 2, ["popen"] * 2
    if config.option.numprocesses and config.option.dist == "no":
        config.option.dist, config.option.loadscopereorder = "loadgroup", False


def pytest_unconfigure(config):
    zygote.stop()


@pytest.hookimpl(optionalhook=True)  # xdist's: the --dist chosen above, for each worker
def pytest_configure_node(node):
    node.workerinput["dist"] = node.config.option.dist


@pytest.hookimpl(tryfirst=True)  # before xdist's worker reads the groups
def pytest_collection_modifyitems(config, items):
    """A test that uses the `trained` fixture is slow. Under the default --dist loadgroup, the units of work:
    each slow test that holds no module- or class-scoped fixture is a unit of its own; every other test stays
    with its module, whose fixtures are then built once. The largest units go first (modules whose own tests
    are slow), then the slow tests one by one, and the quick modules fill in at the end, so that the workers
    finish together."""
    for item in items:
        if "trained" in getattr(item, "fixturenames", ()):
            item.add_marker("slow")
    if not getattr(config.option, "loadgroup", False):  # on an xdist worker under --dist loadgroup only
        return

    def alone(item):
        fixtures = getattr(item, "_fixtureinfo", None)
        return item.get_closest_marker("slow") is not None and fixtures is not None and all(
            defs[-1].scope not in ("module", "class") for defs in fixtures.name2fixturedefs.values())

    module = {item: item.nodeid.split("::")[0] for item in items}
    slow_modules = {module[item] for item in items if item.get_closest_marker("slow") and not alone(item)}
    rank = {item: 1 if alone(item) else 0 if module[item] in slow_modules else 2 for item in items}
    for i, item in enumerate(items):
        if not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(f"own{i}" if rank[item] == 1 else module[item]))
    items.sort(key=rank.get)


def randomize_adapter(model, seed=1):
    """Every tensor each adapter layer declares trainable (trainable(cfg)) moved off its start by 10% of its
    mean size (0.1 where it is zero: B, MiCA's A, VeRA's λ_b), so each one changes the output and a tensor
    that is not saved, loaded or merged shows."""
    import torch
    from dialsum_raw import lora
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora.lora_layers(model):
            for name in sorted(type(m).trainable(m.cfg)):
                t = getattr(m, name)
                t.add_(torch.randn(t.shape, generator=g).to(t.dtype) * 0.1 * (t.abs().mean().item() or 1.0))


def shared_folder(tmp_path_factory, name, make):
    """A folder that `make(folder)` fills once per test run, shared by the xdist workers: the first worker to
    ask builds it under a file lock in the run's common temporary folder, the others wait for it and reuse it
    (a build that failed part-way is redone). Without xdist, a folder of this session's own."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        folder = tmp_path_factory.mktemp(name)
        make(folder)
        return folder
    import shutil
    from filelock import FileLock
    root = tmp_path_factory.getbasetemp().parent  # this run's, above every worker's own
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny random T5 with flan-t5-small's tokenizer (fast tests)."""
    from dialsum_raw.standin import build
    return str(shared_folder(tmp_path_factory, "tiny", lambda f: build(FLAN, str(f), tiny=True)))


@pytest.fixture(scope="session")
def small(tmp_path_factory):
    """flan-t5-small's exact architecture with random weights."""
    from dialsum_raw.standin import build
    return str(shared_folder(tmp_path_factory, "small", lambda f: build(FLAN, str(f))))


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
    """A briefly trained tiny model (full, 50 steps) and LoRA adapter (20 steps): the full model emits EOS at
    varied steps, unlike random weights (the beam tests rely on it: trained longer or at a higher lr, it
    repeats a phrase to the cap instead), and the adapter is not zero. Trained once per test run, whichever
    worker asks first. "full_run" is the full run's folder: test_tiny_model_learns_dialogsum reads its
    losses."""
    import subprocess
    runs = {"full": ["--lora-rank", "0", "--lr", "3e-3", "--max-steps", "50", "--eval-every", "50",
                     "--log-every", "5"],
            "lora": ["--lora-rank", "8", "--lr", "1e-2", "--max-steps", "20", "--eval-every", "20"]}

    def make(root):
        procs = {
            name: subprocess.Popen(
                smoke_cmd(tiny, root / name, *extra),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for name, extra in runs.items()
        }  # side by side: one core each
        for name, proc in procs.items():
            err = proc.communicate()[1]
            assert proc.returncode == 0, err.decode()[-2000:]
    root = shared_folder(tmp_path_factory, "trained", make)
    return {**{name: str(root / name / "best") for name in runs}, "full_run": root / "full"}


def loss_curve(tiny, out, **settings):
    """40 in-process steps of the tiny model from seed 0, fp32, dropout 0.1 with the fast masks, unless
    `settings` say otherwise: the training losses logged every 5 steps."""
    from dialsum_raw import training
    from dialsum_raw.config import Settings, validate
    s = Settings(**{**dict(model=tiny, data=CORPUS, output_dir=str(out), lora_rank=0, lr=3e-3, batch_size=8,
                           max_steps=40, warmup_ratio=0.1, subsample=40, max_source_len=64, max_target_len=24,
                           eval_every=40, log_every=5, seed=0, precision="fp32", dropout=0.1,
                           dropout_impl="fast"), **settings})
    validate(s)
    training.train(s)
    return train_losses(out)


def train_losses(out):
    """The training losses a run logged (its validation lines left out)."""
    return [m["loss"] for m in metric_lines(out) if "val_loss" not in m]


@pytest.fixture(scope="session")
def reference_curve(tiny, tmp_path_factory):
    """reference_curve() -> (the losses of loss_curve's run with its defaults, its folder), run once per test
    run and shared: the fp32 run of test_precision, the fast masks' of test_dropout. A function, so that a
    test runs its own curve first, while another worker may be running this one."""
    made = []

    def get():
        if not made:
            folder = shared_folder(tmp_path_factory, "reference-curve", lambda f: loss_curve(tiny, f / "run"))
            made.append((train_losses(folder / "run"), folder / "run"))
        return made[0]
    return get


# ---------------------------------------------------------------- training runs as the user starts them

def smoke_cmd(tiny, out, *flags):
    """train.py with configs/tiny-smoke.toml on the tiny model and the real corpus, into `out`."""
    import sys

    smoke = os.path.join(REPO, "configs", "tiny-smoke.toml")
    return [sys.executable, os.path.join(REPO, "train.py"), "--config", smoke, "--model", tiny,
            "--data", CORPUS, "--output-dir", str(out), *flags]


def train_cmd(tiny, out, *extra):
    """train.py on the tiny model: every 40th dialogue, short sequences, fp32, a line per step."""
    return smoke_cmd(tiny, out, "--subsample", "40", "--max-source-len", "128", "--max-target-len", "32",
                     "--log-every", "1", "--precision", "fp32", *extra)


def worker_env(rank, nproc, port):
    """What `torchrun --standalone --nproc_per_node nproc` adds to a worker's environment
    (zygote.TORCHRUN_WORKER_ENV), for rank `rank` of a launcher-less run: rank 0 hosts the key-value store
    on `port`, which torchrun's agent would (TORCHELASTIC_USE_AGENT_STORE)."""
    import uuid
    env = {"RANK": rank, "LOCAL_RANK": rank, "ROLE_RANK": rank, "WORLD_SIZE": nproc,
           "LOCAL_WORLD_SIZE": nproc, "ROLE_WORLD_SIZE": nproc, "GROUP_RANK": 0, "GROUP_WORLD_SIZE": 1,
           "ROLE_NAME": "default",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "TORCHELASTIC_RESTART_COUNT": 0,
           "TORCHELASTIC_MAX_RESTARTS": 0, "TORCHELASTIC_RUN_ID": uuid.uuid5(uuid.NAMESPACE_OID, str(port)),
           "TORCHELASTIC_USE_AGENT_STORE": False, "TORCH_NCCL_ASYNC_ERROR_HANDLING": 1, "OMP_NUM_THREADS": 1}
    return {k: str(v) for k, v in env.items()}


def start_ranks(cmd, nproc=2):
    """cmd (a train.py command) as the `nproc` workers of `torchrun --standalone --nproc_per_node nproc`,
    started without the launcher, each with the environment torchrun gives its workers (worker_env), its
    stdout and stderr in `proc.log`. They fork from the zygote: no launcher, and no import of torch, per
    run. For tests whose subject is training over processes; the launcher's own doings (an elastic restart
    that then trains to the end, a killed launcher) run under torchrun."""
    import socket
    import subprocess
    import tempfile
    with socket.socket() as s:  # a free port, for rank 0's store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(nproc):
        log = tempfile.TemporaryFile()
        procs.append(subprocess.Popen(cmd, env={**os.environ, **worker_env(rank, nproc, port)}, stdout=log,
                                      stderr=subprocess.STDOUT))
        procs[-1].log = log
    return procs


def wait_ranks(procs, until=None, timeout=600):
    """Wait for the ranks as torchrun does: once one fails, the others are killed (SIGKILL). With `until`,
    they are all SIGKILLed, one right after the other, as soon as until() holds (as SIGKILL to torchrun's
    process group kills its workers); so are they after `timeout` seconds. Returns the first failed rank's
    status (0: none) and every rank's output."""
    import signal
    import time
    deadline = time.time() + timeout
    while None in (states := [p.poll() for p in procs]):
        if any(states) or (until and until()) or time.time() > deadline:
            for p in procs:
                if p.poll() is None:
                    os.kill(p.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    for p in procs:
        p.wait()
    output = []
    for rank, p in enumerate(procs):
        p.log.seek(0)
        output.append(f"rank {rank} (status {p.returncode}):\n{p.log.read().decode()}")
        p.log.close()
    return next((p.returncode for p in procs if p.returncode), 0), "\n".join(output)


def ranks(cmd, nproc=2, check=True):
    """start_ranks, run to the end: (status, output); with `check`, a failure fails the test with the
    output."""
    status, output = wait_ranks(start_ranks(cmd, nproc))
    assert status == 0 or not check, output[-6000:]
    return status, output


def ranks_killed(cmd, out):
    """start_ranks, SIGKILLed once out/last holds a checkpoint; returns that checkpoint's state."""
    from dialsum_raw import checkpoint
    wait_ranks(start_ranks(cmd), until=lambda: checkpoint.find(str(out / "last")) is not None, timeout=180)
    return checkpoint.load_state(checkpoint.find(str(out / "last")))


def metric_lines(out):
    """A run's metrics.jsonl, one dict per line."""
    import json
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def ckpt_weights(ckpt):
    """A checkpoint folder's tensors: the adapter's, or the whole model's."""
    from safetensors.torch import load_file

    name = (
        "adapter.safetensors"
        if os.path.isfile(os.path.join(ckpt, "adapter.safetensors"))
        else "model.safetensors"
    )
    return load_file(os.path.join(ckpt, name))


def max_diff(a, b):
    """The largest difference between two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# full fine-tuning at lr 1e-2 amplifies summation-order noise in the embedding's near-zero gradients
# through AdamW's eps past 1e-5 (DDP included); at 1e-3 every run here agrees to ~2e-6
MODES = {
    "full": ["--lora-rank", "0", "--lr", "1e-3"],
    "lora": ["--lora-rank", "4", "--lr", "1e-2", "--lora-dropout"],  # + the dropout of the test
    "mica": ["--lora-rank", "4", "--lora-init", "mica", "--lr", "1e-2", "--lora-dropout"],
}  # B frozen, saved


def mode_flags(name, dropout):
    return MODES[name] + ([dropout] if name != "full" else [])


def two_process_cmd(tiny, out, mode, wrapping):
    """The 2-process run with dropout on (embedding, attention, feed-forward and LoRA), 8 steps of batch 4 per
    rank, saved every 3 and validated every 4 steps; full fine-tuning also scores its validation ROUGE on one
    dialogue, which leaves rank 1 nothing to generate."""
    rouge = ["--eval-rouge", "1", "--max-new-tokens", "8"] if mode == "full" else []
    return train_cmd(
        tiny,
        out,
        "--max-steps",
        "8",
        "--save-every",
        "3",
        "--eval-every",
        "4",
        "--dropout",
        "0.1",
        "--batch-size",
        "4",
        *rouge,
        *mode_flags(mode, "0.1"),
        *(["--fsdp"] if wrapping == "fsdp" else []),
    )


@pytest.fixture(scope="session")
def two_process(tiny, tmp_path_factory):
    """two_process(mode, wrapping) -> the folder of that 2-process run (two_process_cmd; wrapping "ddp" or
    "fsdp"), each run once per test run and shared: the DDP tests' uninterrupted references are the runs the
    FSDP tests compare with."""
    made = {}

    def run(mode, wrapping):
        if (mode, wrapping) not in made:
            make = lambda out: ranks(two_process_cmd(tiny, out, mode, wrapping))
            made[mode, wrapping] = shared_folder(tmp_path_factory, f"two-process-{mode}-{wrapping}", make)
        return made[mode, wrapping]
    return run

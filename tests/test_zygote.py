"""tests/zygote.py runs a test's command as `python script args` would: the same stdout, stderr and exit
status, in the caller's cwd and environment, with only the standard streams open."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import zygote
from conftest import smoke_cmd, worker_env

PROBE = """\
import os, sys
print("cwd", os.getcwd())
print("test", os.environ.get("PYTEST_CURRENT_TEST"))
print("argv", sys.argv)
print("path0", sys.path[0])
print("fds", sorted(int(fd) for fd in os.listdir("/proc/self/fd"))[:4])
print("stdin", sys.stdin.read())
print("name", __name__, __file__)
sys.stderr.write("to stderr\\n")
sys.exit(int(sys.argv[1]))
"""


@pytest.fixture
def here(tmp_path, monkeypatch):
    """A folder whose scripts count as the repository's (zygote.ROOTS), for this module's probes."""
    (tmp_path / "here").mkdir()
    monkeypatch.setattr(zygote, "ROOTS", [*zygote.ROOTS, os.path.realpath(tmp_path / "here")])
    return tmp_path / "here"


@pytest.mark.slow
def test_a_command_sees_its_own_cwd_environment_argv_and_stdio(here, tmp_path):
    script = here / "probe.py"
    script.write_text(PROBE)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    cmd = [sys.executable, str(script), "3", "arg with spaces"]
    env = {**os.environ, "PYTEST_CURRENT_TEST": "probe"}  # may differ from the zygote's (NOT_READ_AT_IMPORT)
    proc = zygote.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True)
    assert proc._conn is not None, "not run by the zygote"
    forked = (*proc.communicate("the input"), proc.returncode)
    with zygote.real_processes():
        real = subprocess.run(cmd, cwd=cwd, env=env, input="the input", capture_output=True, text=True)
    assert forked == (real.stdout, real.stderr, real.returncode)
    assert real.returncode == 3 and f"cwd {cwd}\n" in real.stdout and "stdin the input\n" in real.stdout
    assert "test probe\n" in real.stdout
    assert "fds [0, 1, 2, 3]\n" in real.stdout  # 3: the listing itself


@pytest.mark.slow
def test_a_refusal_and_a_short_run_match_a_real_process(tiny, tmp_path):
    """train.py refusing a flag (before any import of torch), then 2 steps of training: byte for byte the
    same output and status (the progress bars aside: they time themselves), and the same metrics."""
    refusal = smoke_cmd(tiny, tmp_path / "r", "--lora-rank", "-1")
    results = []
    for real in (False, True):
        with zygote.real_processes() if real else open(os.devnull):
            proc = subprocess.Popen(refusal, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert (proc._conn is None) == real
            results.append((*proc.communicate(), proc.returncode))
    assert results[0] == results[1] and results[0][2] == 2 and results[0][1].startswith("error: --lora-rank")

    runs = []
    for real in (False, True):
        out = tmp_path / f"real={real}"
        with zygote.real_processes() if real else open(os.devnull):
            res = subprocess.run(smoke_cmd(tiny, out, "--max-steps", "2", "--eval-every", "2", "--subsample",
                                           "200", "--log-every", "1"), capture_output=True, text=True)
        runs.append((res.returncode, _untimed(res.stdout.replace(str(out), "OUT")),
                     _untimed(res.stderr.replace(str(out), "OUT")),
                     _untimed((out / "metrics.jsonl").read_text())))
    assert runs[0] == runs[1] and runs[0][0] == 0 and "trainable model parameters: 4,310,016" in runs[0][1]
    steps = [json.loads(line)["step"] for line in (tmp_path / "real=False" / "metrics.jsonl").open()]
    assert steps == [1, 2, 2]


def _untimed(text):
    """The lines of `text` without progress bars and with no figure that measures time."""
    lines = [line for line in re.split(r"[\r\n]+", text) if line and "%|" not in line]
    return [re.sub(r'"(seconds|tokens_per_second)": [0-9.]+', r'"\1": T', line) for line in lines]


@pytest.mark.slow
def test_signals_and_statuses_are_the_commands_own(here):
    """SIGTERM kills the forked command itself; a SystemExit message goes to stderr with status 1."""
    script = here / "wait.py"
    script.write_text("import sys, time\nprint('up', flush=True)\nif sys.argv[1] == 'msg': sys.exit('bye')\n"
                      "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, str(script), "sleep"], stdout=subprocess.PIPE, text=True)
    assert proc._conn is not None and proc.stdout.readline() == "up\n" and proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == -signal.SIGTERM
    res = subprocess.run([sys.executable, str(script), "msg"], capture_output=True, text=True)
    assert (res.returncode, res.stdout, res.stderr) == (1, "up\n", "bye\n")


@pytest.mark.slow
def test_a_command_started_with_sigint_ignored_is_forked_with_it_ignored(here):
    """preexec_fn=zygote.ignore_sigint (as a shell starts a background job), the one preexec_fn the zygote
    runs itself: the forked command finds SIGINT ignored, as a real one does."""
    script = here / "sigint.py"
    script.write_text("import signal\nprint(repr(signal.getsignal(signal.SIGINT)))\n")
    seen = []
    for real in (False, True):
        with zygote.real_processes() if real else open(os.devnull):
            proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                                    preexec_fn=zygote.ignore_sigint)
            seen.append((proc.communicate()[0], proc._conn is None))
    assert seen == [("<Handlers.SIG_IGN: 1>\n", False), ("<Handlers.SIG_IGN: 1>\n", True)]


@pytest.mark.slow
def test_what_the_zygote_cannot_run_alike_is_a_real_process(here, tmp_path):
    """Another environment (read at import time), a new session, a preexec_fn, `-c`, torchrun, a script from
    outside the repository: fork + exec."""
    script, outside = str(here / "x.py"), str(tmp_path / "x.py")
    for path in (script, outside):
        open(path, "w").write("pass\n")
    for cmd, kw in (([sys.executable, script], {"env": {**os.environ, "OMP_NUM_THREADS": "2"}}),
                    ([sys.executable, script], {"start_new_session": True}),
                    ([sys.executable, script], {"preexec_fn": lambda: None}),
                    ([sys.executable, "-c", "pass"], {}),
                    ([sys.executable, "-m", "torch.distributed.run", "--help"],
                     {"stdout": subprocess.DEVNULL}),
                    ([sys.executable, outside], {})):
        proc = subprocess.Popen(cmd, **kw)
        assert proc.wait() == 0 and proc._conn is None, (cmd, kw)
    proc = zygote.Popen([sys.executable, script])
    assert proc.wait() == 0 and proc._conn is not None


@pytest.mark.slow
def test_a_forked_commands_own_commands_are_forked_and_a_real_ones_are_real(here):
    """A sweep run by the zygote starts its train.py runs through it too; a real process (a sweep in a
    session of its own, killed with its runs) starts real ones."""
    script = here / "starts.py"
    script.write_text("import subprocess, sys\n"
                      "proc = subprocess.Popen([sys.executable, '-m', 'dialsum_raw.errors'])\n"
                      "print(proc.wait(), getattr(proc, '_conn', None) is not None)\n")
    outputs = []
    for real in (False, True):
        with zygote.real_processes() if real else open(os.devnull):
            outputs.append(subprocess.run([sys.executable, str(script)], capture_output=True, text=True))
    assert [(r.returncode, r.stdout, r.stderr) for r in outputs] == [(0, "0 True\n", ""),
                                                                     (0, "0 False\n", "")]


@pytest.mark.slow
def test_importing_what_the_zygote_preloads_reads_no_torchrun_worker_variable():
    """A run's ranks fork from the zygote each with its own RANK, MASTER_PORT, ... (conftest.worker_env):
    right only while no module the zygote imported read them at import. OMP_NUM_THREADS, which torch reads
    at import, shows that the watch sees a read."""
    probe = f"""
import importlib, os, sys
read = set()
class Watched(type(os.environ)):
    def __getitem__(self, key):  # get(), `in` and os.getenv come here too
        read.add(key)
        return super().__getitem__(key)
os.environ.__class__ = Watched
sys.path.insert(0, {os.path.dirname(zygote.__file__)!r})
import zygote
for name in zygote.PRELOAD:
    importlib.import_module(name)
print(sorted(read & set(zygote.TORCHRUN_WORKER_ENV)), "OMP_NUM_THREADS" in read)
"""
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.splitlines()[-1] == "[] True", res.stderr[-2000:]
    proc = subprocess.Popen([sys.executable, "-m", "dialsum_raw.sweep", "--help"], stdout=subprocess.DEVNULL,
                            env={**os.environ, **worker_env(1, 2, 29500)})
    assert proc.wait() == 0 and proc._conn is not None, "a rank's variables made the command a real process"

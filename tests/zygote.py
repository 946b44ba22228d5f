"""Test commands forked from a process that has already imported torch, transformers and dialsum_raw.

Importing them costs a new Python process 2.5-4 CPU-s, most of a tiny training run, and the suite starts about
a hundred such commands. With `install()` (tests/conftest.py), `subprocess.Popen` (and so `subprocess.run`)
hands an eligible command to a zygote: one server per test process, started on first use, which imported
everything and computed nothing (one thread, checked before each fork). For each command it forks a helper,
which forks the command's process and reports its wait status. That process takes the caller's stdin, stdout
and stderr (the file descriptors, passed over the socket), cwd and argv, then runs the script or `-m` module
as `__main__` and exits as Python's own shutdown does (SystemExit's code, a traceback and 1, threads joined,
atexit handlers, streams flushed). It is a real process: its pid, signals, file locks and exit status are
its own, and the Popen object is the standard one apart from how it starts and waits.

Eligible: `[sys.executable, /abs/script.py, ...]` for a script of this repository (ROOTS), or
`[sys.executable, "-m", "dialsum_raw...", ...]` (not the bench), with the zygote's environment
(NOT_READ_AT_IMPORT aside, torchrun's per-worker variables included: what is read at import time,
OMP_NUM_THREADS included, must be the same) and none of a preexec_fn (but PREEXEC's), start_new_session,
process_group, pass_fds, a user or group, umask, shell or executable. Everything else, torchrun included, is
a real `fork` + `exec`, and so is every command while `real_processes()` is in force (the `real_processes`
marker) or DIALSUM_ZYGOTE=0. A forked command's own commands (a sweep's train.py runs) go to the same
zygote by the same rules; a real process's never do.
"""

import contextlib
import json
import os
import select
import socket
import subprocess
import sys

# What torchrun gives each of its workers (torch.distributed.elastic's LocalElasticAgent), which differs from
# rank to rank and run to run: read when the process group starts, never at import (test_zygote checks that
# importing PRELOAD reads none of them). tests/conftest.ranks starts a run's ranks with it, from the zygote.
TORCHRUN_WORKER_ENV = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
    "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING")
# Variables that may differ from the zygote's: read by nothing at import time (each command gets its own
# values in os.environ). pytest sets the first per test phase, torch's inductor the second on first use.
NOT_READ_AT_IMPORT = {"PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR", *TORCHRUN_WORKER_ENV}
PRELOAD = ("torch", "transformers", "transformers.models.t5.modeling_t5", "transformers.models.t5",
           "tokenizers", "safetensors.torch", "rouge_score.rouge_scorer", "tqdm.auto", "dialsum_raw.training",
           "dialsum_raw.compare", "dialsum_raw.summarize", "dialsum_raw.sweep", "dialsum_raw.data",
           "dialsum_raw.lora.cli", "dialsum_raw.standin")  # imported, never run (no `-m` entry's __main__)
# The project's own scripts (train.py, evaluate.py); a script a test writes for itself is often about the
# process (its memory, its start) and runs as a real one.
ROOTS = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
BENCH = "dialsum_raw.bench"  # measures its own processes (peak memory of a fresh one): never forked
_real = subprocess.Popen
# (the server's Popen, None in a forked command; the socket path; the environment it started with)
_server = None
_enabled = os.environ.get("DIALSUM_ZYGOTE", "1") != "0"


@contextlib.contextmanager
def real_processes():
    """Every command in this block is a real fork + exec (tests about the process boundary itself)."""
    global _enabled
    was, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = was


def ignore_sigint():
    """A preexec_fn: the command starts with SIGINT ignored, as a shell starts a job in the background."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# preexec_fns the zygote runs itself, in the forked command before it starts (by name over the socket)
PREEXEC = {"ignore_sigint": ignore_sigint}


def install():
    """From now on, subprocess.Popen (and subprocess.run, which calls it) send eligible commands here."""
    subprocess.Popen = Popen


def _script(args):
    """What the command runs ("path", file) or ("module", name), or None if the zygote cannot run it."""
    if len(args) < 2 or args[0] != sys.executable:
        return None
    if args[1] == "-m" and len(args) > 2 and args[2].split(".")[0] == "dialsum_raw" and args[2] != BENCH:
        return "module", args[2]
    if args[1].endswith(".py") and os.path.isabs(args[1]) and os.path.isfile(args[1]) and any(
            os.path.realpath(args[1]).startswith(root + os.sep) for root in ROOTS):
        return "path", args[1]
    return None


def _same_env(a, b):
    return {k: v for k, v in a.items() if k not in NOT_READ_AT_IMPORT} == {
        k: v for k, v in b.items() if k not in NOT_READ_AT_IMPORT}


def _connect():
    """A connection to this process's zygote, started on first use; None if it is gone."""
    global _server
    if _server is None:
        import tempfile
        path = os.path.join(tempfile.mkdtemp(prefix="zygote-"), "socket")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind(path)
        listener.listen(64)
        # os.environ as it is, without what C code set behind its back (readline exports LINES and COLUMNS)
        env = dict(os.environ)
        proc = _real([sys.executable, os.path.abspath(__file__), str(listener.fileno())], env=env,
                     pass_fds=[listener.fileno()], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        listener.close()  # the server holds it; the socket path stays
        _server = proc, path, env
    proc, path, _ = _server
    if proc is not None and proc.poll() is not None:
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        conn.connect(path)
    except OSError:  # in a forked command: its test process, and so the zygote, have ended
        conn.close()
        return None
    return conn


def stop():
    """End the server, if any, and wait for it, so that its CPU time and its commands' count as this
    process's children's (as /usr/bin/time and resource.getrusage report them)."""
    if _server is None or _server[0] is None or _server[0].stdin.closed:
        return
    proc = _server[0]
    proc.stdin.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=60)


class Popen(subprocess.Popen):
    """subprocess.Popen, whose eligible commands run forked from the zygote (see the module docstring)."""

    _conn = None

    def _execute_child(self, args, executable, preexec_fn, close_fds, pass_fds, cwd, env, startupinfo,
                       creationflags, shell, p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite,
                       restore_signals, gid, gids, uid, umask, start_new_session, process_group):
        args = [os.fsdecode(a) for a in args] if isinstance(args, (list, tuple)) else args
        run = _script(args) if isinstance(args, list) and _enabled else None
        env = dict(os.environ if env is None else {os.fsdecode(k): os.fsdecode(v) for k, v in env.items()})
        preexec = next((name for name, fn in PREEXEC.items() if fn is preexec_fn), None)
        plain = (executable is None and (preexec_fn is None or preexec) and not pass_fds and not shell
                 and not start_new_session and process_group in (None, -1) and gid is None and gids is None
                 and uid is None and umask < 0 and (cwd is None or os.path.isdir(cwd)))
        conn = _connect() if run and plain and _same_env(env, (_server or (0, 0, os.environ))[2]) else None
        if conn is None:
            return super()._execute_child(
                args, executable, preexec_fn, close_fds, pass_fds, cwd, env, startupinfo, creationflags,
                shell, p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite, restore_signals, gid, gids,
                uid, umask, start_new_session, process_group)
        request = {"run": run, "argv": args[1:], "env": env, "cwd": os.path.abspath(os.fsdecode(cwd or ".")),
                   "preexec": preexec}
        stdio = [p2cread if p2cread != -1 else 0, c2pwrite if c2pwrite != -1 else 1,
                 errwrite if errwrite != -1 else 2]
        socket.send_fds(conn, [json.dumps(request).encode()], stdio)
        reply = conn.recv(64)
        self._close_pipe_fds(p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite)
        if not reply.startswith(b"pid "):
            raise subprocess.SubprocessError(f"zygote: {reply.decode()}")
        self.pid, self._conn, self._child_created = int(reply.split()[1]), conn, True

    def _status(self, block):
        """The command's wait status, reported by the zygote once it exited; None while it runs."""
        if self._conn.fileno() == -1:
            return None
        if not block and not select.select([self._conn], [], [], 0)[0]:
            return None
        reply = self._conn.recv(64)
        self._conn.close()
        return int(reply) if reply else 255 << 8  # the helper itself died

    def _try_wait(self, wait_flags):
        if self._conn is None:
            return super()._try_wait(wait_flags)
        sts = self._status(block=not wait_flags & os.WNOHANG)
        return (0, 0) if sts is None else (self.pid, sts)

    def _internal_poll(self, _deadstate=None, **kw):
        if self._conn is None:
            return super()._internal_poll(_deadstate, **kw)
        if self.returncode is None and self._waitpid_lock.acquire(False):
            try:
                if self.returncode is None and (sts := self._status(block=False)) is not None:
                    self._handle_exitstatus(sts)
            finally:
                self._waitpid_lock.release()
        return self.returncode


# ---------------------------------------------------------------- the server (python tests/zygote.py FD)

def serve(listener_fd):
    import importlib
    import threading
    started = dict(os.environ)  # the test process's (_connect), before any import set something
    for name in PRELOAD:
        importlib.import_module(name)
    sys.stdout.flush()
    sys.stderr.flush()
    listener = socket.socket(fileno=listener_fd)
    while True:
        ready = select.select([listener, 0], [], [])[0]
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        if 0 in ready and not os.read(0, 1024):  # the test process has ended (or gone)
            return
        if listener in ready:
            conn = listener.accept()[0]
            threads = len(os.listdir("/proc/self/task"))
            if threads != 1 or threading.active_count() != 1:
                conn.send(f"refused: the zygote has {threads} threads".encode())
            elif os.fork() == 0:
                path = listener.getsockname()
                listener.close()
                _helper(conn, (path, started))
            conn.close()


def _helper(conn, zygote):
    """Fork the command, report its pid, wait for it, report its wait status."""
    code = 0
    try:
        message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        request = json.loads(message)
        pid = os.fork()
        if pid == 0:
            conn.close()
            _run(request, fds, zygote)
        for fd in fds:
            os.close(fd)
        conn.send(f"pid {pid}".encode())
        conn.send(str(os.waitpid(pid, 0)[1]).encode())
    except BaseException:
        code = 1
    os._exit(code)


def _run(request, fds, zygote):
    """Become `python SCRIPT ARGS` / `python -m MODULE ARGS`, then exit as its interpreter would. The
    commands it starts go to this zygote too, by the same rules (a sweep's train.py runs)."""
    global _server
    import atexit
    import runpy
    import signal
    import threading
    import warnings
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    os.chdir(request["cwd"])
    _server = None, *zygote
    install()
    os.environ.clear()
    os.environ.update(request["env"])
    if request["preexec"]:
        PREEXEC[request["preexec"]]()
    kind, what = request["run"]
    sys.argv = [what, *request["argv"][2 if kind == "module" else 1:]]
    sys.path[0] = os.path.dirname(os.path.realpath(what)) if kind == "path" else os.getcwd()
    sys.stdout.reconfigure(line_buffering=sys.stdout.isatty())  # as a new process sets it for its fd 1
    # runpy's note that the module was imported before it ran: here by PRELOAD, in a new process never
    # (dialsum_raw/__init__.py imports no submodule)
    warnings.filterwarnings("ignore", message=".*found in sys.modules after import of package")
    code, signalled = 0, None
    try:
        if kind == "path":
            runpy.run_path(what, run_name="__main__")
        else:
            runpy.run_module(what, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException as e:
        sys.excepthook(type(e), e, e.__traceback__)
        code = 1
        if isinstance(e, KeyboardInterrupt):  # Python then dies of the SIGINT itself
            signalled = signal.SIGINT
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            code = code or 120
    if signalled:
        signal.signal(signalled, signal.SIG_DFL)
        os.kill(os.getpid(), signalled)
    os._exit(code & 0xFF)


if __name__ == "__main__":
    serve(int(sys.argv[1]))

"""Checkpoints that are whole or absent: written into a temporary folder, then renamed into place.

A checkpoint folder holds either a full model (save_pretrained + tokenizer) or a LoRA adapter
(adapter.json + adapter.safetensors). last/ adds trainer_state.pt: optimizer, scheduler, step,
sampler position and every rank's RNG state, which is what --resume needs to continue bit for bit;
best/ adds only best.json (its step and metric value).
"""

import errno
import fcntl
import json
import os
import random
import re
import shutil
import socket
import time
from contextlib import contextmanager

import torch

from .errors import UserError
from .lora import lora_layers, read_adapter, save_adapter

TRAINER_STATE = "trainer_state.pt"
BEST_STATE = "best.json"
OPTIMIZER_SHARDS = "optimizer"  # last/'s optimizer moments under --fsdp, one DCP file per rank (sharding.py)
LOCK_FILE = ".lock"


def _fsync(path):
    """Flush a file or folder to the disk: a rename is durable only once what it points to is."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root):
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(os.path.join(folder, name))
        _fsync(folder)


@contextmanager
def atomic_dir(path, lead=True, barrier=None):
    """Yield a temporary folder that replaces `path` only once everything in it is on disk.

    A crash (of the process or the machine) before the swap leaves the old `path` untouched; a crash
    between the two renames leaves the complete old checkpoint at `path.old`, which `find` picks up.
    When several processes write into it (every rank, under --fsdp), all of them enter; the lead alone
    creates and publishes it, and barrier() lets the others in once it exists and holds the swap until
    all have written.
    """
    tmp, old = f"{path}.tmp", f"{path}.old"
    if lead:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if barrier:
        barrier()
    yield tmp
    if barrier:
        barrier()
    if not lead:
        return
    _fsync_tree(tmp)
    if os.path.isdir(path):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
    os.rename(tmp, path)
    _fsync(os.path.dirname(os.path.abspath(path)))
    shutil.rmtree(old, ignore_errors=True)


def atomic_write(path, text):
    """Replace a text file whole: written beside it, flushed to disk, then renamed over it."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(os.path.dirname(os.path.abspath(path)))


def prepare_output_dir(out, overwrite, marker, resumable=False):
    """Refuse to clobber a folder unless asked, before any work is done; --overwrite deletes only
    folders this project wrote (recognised by `marker`, a file it always leaves there)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"output dir {out} exists and is a file")
    found = set(os.listdir(out)) - {LOCK_FILE, f"{LOCK_FILE}.excl"} if os.path.isdir(out) else set()
    if not found:
        return
    if not overwrite:
        raise UserError(f"output dir {out} already exists and is not empty; pass --overwrite to replace it"
                        + (f" or --resume {out} to continue it" if resumable else ""))
    if not os.path.isfile(os.path.join(out, marker)):
        raise UserError(f"--overwrite refuses to delete {out}: it does not look like a dialsum_raw output "
                        f"(no {marker})")
    for name in found:  # the lock file stays: a newcomer must find the lock this run holds, not a new file
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


# flock's errors on filesystems without it (Lustre without -o flock, some NFS mounts): lock() then falls back
NO_FLOCK = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL}


def _holder():
    return f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n"


def _open_lock(path, flags, mode="r+"):
    """A lock file opened, or one line saying why it cannot be (a folder there, no permission)."""
    try:
        return os.fdopen(os.open(path, flags, 0o644), mode, encoding="utf-8", errors="replace")
    except IsADirectoryError:
        raise UserError(f"{path} is a folder, not a lock file: remove it") from None
    except PermissionError:
        raise UserError(f"cannot write the lock file {path} (permission denied): the output folder must be "
                        "writable by this user") from None


@contextmanager
def lock(folder):
    """Hold folder/.lock for the with-block, with this process's pid, host and start time in the file. While
    another process holds it, refused, naming that process.

    Where the filesystem has flock (local disks; NFS and Lustre where mounted with locking, see
    docs/scale.md): an exclusive flock, which the kernel drops with its process, so a lock file a crash left
    behind never blocks. Where it has none (flock fails with ENOSYS, EOPNOTSUPP, ENOLCK or EINVAL):
    folder/.lock.excl, created with O_EXCL and removed at the block's end; one a crash left behind is stale,
    and taken over, when it names a process of this host that is gone (one of another host cannot be checked:
    refused, saying to delete it).

    The .lock file stays in a run folder when the run finishes or stops (SIGINT, SIGTERM); a block that ends
    in an error, in a folder that had no lock file, takes the file away again: a refused start leaves a
    folder as it found it."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"output dir {folder} exists and is a file")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_FILE)
    new = not os.path.exists(path)
    with _open_lock(path, os.O_RDWR | os.O_CREAT) as f:
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = None
            except BlockingIOError:
                f.seek(0)
                raise UserError(
                    f"{folder} is in use by {f.read().strip() or 'another process'}; wait for it or stop it"
                )
            except OSError as e:
                if e.errno not in NO_FLOCK:
                    raise UserError(f"cannot lock {path} ({e.strerror})") from None
                held = _exclusive(f"{path}.excl", folder)
            f.seek(0)
            f.truncate(0)
            f.write(_holder())
            f.flush()
            try:
                yield
            finally:
                if held:
                    os.remove(held)
        except UserError:
            if new:
                os.remove(path)
            raise


def _exclusive(path, folder):
    """lock()'s fallback without flock: `path` created with O_EXCL, holding _holder(); a stale one (a process
    of this host that is gone) is replaced once. Returns the path, to remove at the end."""
    for _ in range(2):
        try:
            with _open_lock(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, "w") as f:
                f.write(_holder())
            return path
        except FileExistsError:
            with _open_lock(path, os.O_RDONLY, "r") as f:
                holder = f.read().strip()
            found = re.fullmatch(r"pid (\d+) on (\S+) since .*", holder)
            if not (found and found.group(2) == socket.gethostname() and not _alive(int(found.group(1)))):
                raise UserError(
                    f"{folder} is in use by {holder or 'another process'} (a lock file, {path}: this "
                    "filesystem has no flock); wait for it or stop it, or delete that file if the "
                    "process is gone"
                ) from None
            os.remove(path)  # stale: its process is gone
    raise UserError(f"{folder}: {path} keeps coming back; another process is taking the lock")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def find(path):
    """The complete checkpoint at `path` (or its `.old` twin after an interrupted swap), else None."""
    for candidate in (path, f"{path}.old"):
        if os.path.isfile(os.path.join(candidate, TRAINER_STATE)):
            return candidate
    return None


def rng_state():
    """This process's RNG states as tensors and lists only, so trainer_state.pt loads with weights_only=True.
    On CUDA only the current device's generator: each rank owns one device."""
    version, internal, gauss = random.getstate()
    state = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(path, model, tokenizer, base_model, trainer_state: dict, shards=None, lead=True, barrier=None):
    """Model or adapter + trainer_state.pt (optimizer, scheduler, per-rank RNG, counters), atomically.
    Under --fsdp every rank calls it: each writes its optimizer shards (`shards(folder)`) into the same
    folder, and the lead (rank 0), which holds the gathered weights, writes the rest."""
    with atomic_dir(path, lead, barrier) as tmp:
        if shards:
            shards(tmp)
        if not lead:
            return
        if lora_layers(model):
            save_adapter(model, tmp, base_model)
        else:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        torch.save(trainer_state, os.path.join(tmp, TRAINER_STATE))


def save_best(last, best, info: dict):
    """best/ from last/: the weights and best.json (step, metric, value), no optimizer state."""
    with atomic_dir(best) as tmp:
        for name in os.listdir(last):
            if name not in (TRAINER_STATE, OPTIMIZER_SHARDS):
                shutil.copy2(os.path.join(last, name), tmp)
        with open(os.path.join(tmp, BEST_STATE), "w") as f:
            json.dump(info, f, indent=2)


def best_step(best):
    """The step best/ was saved at, or None when it is absent or unreadable."""
    try:
        with open(os.path.join(best, BEST_STATE)) as f:
            return json.load(f)["step"]
    except (OSError, ValueError, KeyError):
        return None


def load_state(path) -> dict:
    """trainer_state.pt of a checkpoint, checked. It holds only tensors and plain types and is read with
    weights_only=True, so a checkpoint from elsewhere cannot run code; anything else is refused."""
    file = os.path.join(path, TRAINER_STATE)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        blocked = re.search(r"unsupported GLOBAL (\S+)", str(e))
        if blocked:
            raise UserError(
                f"{file}: refused: it asks to load the Python object {blocked.group(1)}, which could run "
                "code; a dialsum_raw trainer state holds only tensors and plain values"
            )
        raise UserError(f"{file}: truncated or corrupted checkpoint ({type(e).__name__}); "
                        "delete it to restart, or resume from another run")
    if not isinstance(state, dict) or "step" not in state or "optimizer" not in state:
        raise UserError(f"{file}: not a dialsum_raw trainer state")
    state["is_adapter"] = os.path.isfile(os.path.join(path, "adapter.json"))
    if state["is_adapter"]:
        read_adapter(path)  # fails early and clearly on a corrupted adapter
    return state

"""Checkpoints that are whole or absent: written into a temporary folder, then renamed into place.

A checkpoint folder holds either a full model (save_pretrained + tokenizer) or a LoRA adapter
(adapter.json + adapter.safetensors), plus trainer_state.pt: optimizer, scheduler, step,
sampler position and every RNG state, which is what --resume needs to continue bit for bit.
"""

import os
import random
import shutil
from contextlib import contextmanager

import torch

from .errors import UserError
from .lora import lora_layers, read_adapter, save_adapter

TRAINER_STATE = "trainer_state.pt"


@contextmanager
def atomic_dir(path):
    """Yield a temporary folder that replaces `path` only once everything in it is written.

    A crash before the swap leaves the old `path` untouched; a crash between the two renames
    leaves the complete old checkpoint at `path.old`, which `find` picks up.
    """
    tmp, old = f"{path}.tmp", f"{path}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    yield tmp
    if os.path.isdir(path):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def prepare_output_dir(out, overwrite, marker, remove=True, resumable=False):
    """Refuse to clobber a folder unless asked, before any work is done; --overwrite deletes only
    folders this project wrote (recognised by `marker`, a file it always leaves there)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"output dir {out} exists and is a file")
    if not (os.path.isdir(out) and os.listdir(out)):
        return
    if not overwrite:
        raise UserError(f"output dir {out} already exists and is not empty; pass --overwrite to replace it"
                        + (f" or --resume {out} to continue it" if resumable else ""))
    if not os.path.isfile(os.path.join(out, marker)):
        raise UserError(f"--overwrite refuses to delete {out}: it does not look like a dialsum_raw output "
                        f"(no {marker})")
    if remove:
        shutil.rmtree(out)


def find(path):
    """The complete checkpoint at `path` (or its `.old` twin after an interrupted swap), else None."""
    for candidate in (path, f"{path}.old"):
        if os.path.isfile(os.path.join(candidate, TRAINER_STATE)):
            return candidate
    return None


def rng_state():
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path, model, tokenizer, base_model, optimizer, scheduler, progress: dict):
    """Model or adapter + trainer state, atomically. `progress` holds step, epoch position, metrics."""
    with atomic_dir(path) as tmp:
        if lora_layers(model):
            save_adapter(model, tmp, base_model)
        else:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": rng_state(), **progress}, os.path.join(tmp, TRAINER_STATE))


def copy(src, dst):
    """Atomic copy of a finished checkpoint (last/ -> best/)."""
    with atomic_dir(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)


def load_state(path) -> dict:
    """trainer_state.pt of a checkpoint, checked: a truncated or foreign file is a UserError."""
    file = os.path.join(path, TRAINER_STATE)
    try:
        state = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"{file}: truncated or corrupted checkpoint ({type(e).__name__}); "
                        "delete it to restart, or resume from another run")
    if not isinstance(state, dict) or "step" not in state or "optimizer" not in state:
        raise UserError(f"{file}: not a dialsum_raw trainer state")
    state["is_adapter"] = os.path.isfile(os.path.join(path, "adapter.json"))
    if state["is_adapter"]:
        read_adapter(path)  # fails early and clearly on a corrupted adapter
    return state

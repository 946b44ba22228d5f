"""How the model is spread over processes, and how its checkpoints are gathered: DDP or FSDP2.

DDP keeps the whole model, its gradients and AdamW's two moments on every process: 16 bytes per
parameter. With --fsdp, FSDP2 (`fully_shard`, one unit per T5 block, then the root for the embeddings,
head and final norms) keeps 1/N of each on each process and gathers one block's weights just before
its forward and backward. Gradients leave the backward already reduced and sharded.

Checkpoints stay ordinary folders: the weights (or the adapter) are gathered to rank 0, on the CPU,
and written by save_pretrained / save_adapter as in a one-process run. Only the optimizer's moments
are written sharded, with torch.distributed.checkpoint (DCP), into last/optimizer/; its param groups,
scheduler, counters and every rank's RNG stay in trainer_state.pt. Loading the shards runs no pickled
code: DCP's metadata goes through an allow-list of its own classes and only tensors are read.

Training code asks this module, never `isinstance`: the loop body is the same for 1 process, DDP and FSDP.
"""

import os
import pickle
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)

from .checkpoint import OPTIMIZER_SHARDS
from .lora import AdapterLinear
from .errors import UserError


def check(fsdp: bool, world: int):
    """--fsdp shards over the processes torchrun starts; alone it would have nothing to shard over."""
    if fsdp and world < 2:
        raise UserError("--fsdp shards the model over processes: start it with torchrun --nproc_per_node N "
                        "(N >= 2) train.py ...")


def wrap(model, fsdp: bool, world: int, device, precision: str):
    """The model the loop calls, on `device`: itself (1 process), DDP, or sharded in place by FSDP2, which
    moves each unit to the device as it shards it, so a GPU never holds more than one whole block. Under
    bf16, FSDP2 computes with bf16 copies of the weights and reduces gradients in fp32; the fp32 shards
    stay the master weights the optimizer updates."""
    if world == 1 or not fsdp:
        model.to(device)
        return model if world == 1 else torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    mesh = init_device_mesh(device.type, (world,))
    mp = (
        MixedPrecisionPolicy(torch.bfloat16, torch.float32) if precision == "bf16" else MixedPrecisionPolicy()
    )
    for block in (*model.encoder.block, *model.decoder.block):
        fully_shard(block, mesh=mesh, mp_policy=mp)
    return fully_shard(model, mesh=mesh, mp_policy=mp)


def is_sharded(model) -> bool:
    return isinstance(model, FSDPModule)


def no_sync(model):
    """The context for a micro-batch that is not the last of its accumulation window. DDP keeps its
    gradients local until the last one; FSDP reduce-scatters after each, which keeps them sharded
    (holding them whole until the window ends would cost DDP's gradient memory)."""
    return model.no_sync() if isinstance(model, torch.nn.parallel.DistributedDataParallel) else nullcontext()


@contextmanager
def whole(model):
    """Evaluation with the whole weights on every rank (in the compute dtype), resharded afterwards.
    Validation and beam search run different numbers of forward passes on different ranks and call the
    encoder and decoder directly, so they cannot wait on each other's block gathers."""
    if not is_sharded(model):
        yield
        return
    units = [m for m in model.modules() if is_sharded(m)]
    model.set_reshard_after_forward(False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
        model.set_reshard_after_forward(True)
        model.set_reshard_after_forward(False, recurse=False)  # FSDP2's default: the root keeps its weights


@contextmanager
def full_weights(model, trainable_only: bool):
    """On rank 0, the model with whole CPU tensors in place of its shards (only the trainable ones for
    LoRA), so save_pretrained and save_adapter write the usual folder; other ranks only help gather.
    Never a whole copy on every rank. A no-op unless sharded."""
    if not is_sharded(model):
        yield model
        return
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                ignore_frozen_params=trainable_only))
    if (
        trainable_only
    ):  # an adapter's frozen tensors (MiCA's B) are saved with it: gathered too, on every rank alike
        for owner, module in model.named_modules():
            if isinstance(module, AdapterLinear):
                full.update({f"{owner}.{name}": p.full_tensor().cpu()
                             for name, p in module.named_parameters(recurse=False) if not p.requires_grad})
    swapped, whole_of = [], {}  # (module, name, shard); a tied shard gets one whole tensor, so it stays tied
    for key, tensor in full.items():
        owner, _, name = key.rpartition(".")
        module = model.get_submodule(owner)
        shard = module._parameters[name]
        swapped.append((module, name, shard))
        module._parameters[name] = whole_of.setdefault(
            id(shard), torch.nn.Parameter(tensor, requires_grad=False)
        )
    try:
        yield model
    finally:
        for module, name, shard in swapped:
            module._parameters[name] = shard


def optimizer_state(model, optimizer):
    """(what trainer_state.pt keeps of the optimizer, a writer of its shards into a checkpoint folder or
    None). Sharded: the param groups (plain values) in trainer_state.pt, the moments as DCP, each rank its
    part."""
    if not is_sharded(model):
        return optimizer.state_dict(), None
    state = get_optimizer_state_dict(model, optimizer)

    def write(folder):
        dcp.save({"state": state["state"]}, storage_writer=dcp.FileSystemWriter(
            os.path.join(folder, OPTIMIZER_SHARDS), sync_files=True))
    return {"sharded": OPTIMIZER_SHARDS, "param_groups": state["param_groups"]}, write


def load_optimizer(model, optimizer, saved: dict, folder):
    """Restore what optimizer_state saved: a plain state dict, or the param groups plus the DCP shards,
    read into this rank's part of each moment."""
    if "sharded" not in saved:
        optimizer.load_state_dict(saved)
        return
    state = get_optimizer_state_dict(model, optimizer)["state"]  # this rank's shards, filled in place below
    read_shards({"state": state}, os.path.join(folder, saved["sharded"]))
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": saved["param_groups"]})


def read_shards(state: dict, path):
    """Fill the tensors of `state` from the DCP folder `path`, refusing anything that would run pickled
    code."""
    try:
        dcp.load(state, storage_reader=_SafeReader(path), planner=_TensorsOnly())
    except (
        Exception,
        dcp.CheckpointException,
    ) as e:  # the latter a BaseException, wrapping each rank's error
        cause = next(iter(getattr(e, "failures", {}).values()), (e,))[0]
        if isinstance(cause, UserError):
            raise cause
        raise UserError(
            f"{path}: unreadable optimizer shards ({type(cause).__name__}: {cause}); delete the run's "
            "last/ to restart, or resume from another run"
        )


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's .metadata is a pickle; only DCP's own record classes (and the torch/pathlib values they hold)
    may be built from it, as torch.load(weights_only=True) allows only tensors and plain values."""
    ALLOWED = {
        ("torch.distributed.checkpoint.metadata", n)
        for n in (
            "Metadata",
            "TensorStorageMetadata",
            "TensorProperties",
            "ChunkStorageMetadata",
            "BytesStorageMetadata",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        )
    } | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
        *{
            ("torch", str(t).removeprefix("torch."))
            for t in (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.int32)
        },
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise UserError(
                f"optimizer shards: refused: the metadata asks to load the Python object {module}.{name}, "
                "which could run code; DCP metadata holds only its own records"
            )
        return super().find_class(module, name)


class _SafeReader(dcp.FileSystemReader):
    """DCP's file reader with .metadata read through the allow-list above."""

    def read_metadata(self, *args, **kwargs):
        with open(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        metadata.storage_meta = metadata.storage_meta or StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _TensorsOnly(dcp.DefaultLoadPlanner):
    """DCP's planner without its one torch.load(weights_only=False): we save tensors only, so a pickled item
    is refused."""

    def load_bytes(self, read_item, value):
        raise UserError(
            f"optimizer shards: refused: {read_item.dest_index.fqn} is a pickled object, not a tensor"
        )

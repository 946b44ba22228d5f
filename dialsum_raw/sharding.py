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
torch.distributed.fsdp and .checkpoint (0.6 s to import, with DTensor and sympy) are imported only by a
sharded run, so a run without --fsdp, and `train.py --help`, start without them.
"""

import os
import sys
from contextlib import contextmanager, nullcontext

import torch

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
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.type, (world,))
    mp = (
        MixedPrecisionPolicy(torch.bfloat16, torch.float32) if precision == "bf16" else MixedPrecisionPolicy()
    )
    for block in (*model.encoder.block, *model.decoder.block):
        fully_shard(block, mesh=mesh, mp_policy=mp)
    return fully_shard(model, mesh=mesh, mp_policy=mp)


def is_sharded(model) -> bool:
    """An FSDP2 module; none exists before wrap has imported FSDP2."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


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
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
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
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from .optimizer_shards import write_shards
    state = get_optimizer_state_dict(model, optimizer)

    def write(folder):
        write_shards({"state": state["state"]}, os.path.join(folder, OPTIMIZER_SHARDS))
    return {"sharded": OPTIMIZER_SHARDS, "param_groups": state["param_groups"]}, write


def load_optimizer(model, optimizer, saved: dict, folder):
    """Restore what optimizer_state saved: a plain state dict, or the param groups plus the DCP shards,
    read into this rank's part of each moment."""
    if "sharded" not in saved:
        optimizer.load_state_dict(saved)
        return
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    from .optimizer_shards import read_shards
    state = get_optimizer_state_dict(model, optimizer)["state"]  # this rank's shards, filled in place below
    read_shards({"state": state}, os.path.join(folder, saved["sharded"]))
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": saved["param_groups"]})

"""The optimizer's moments under --fsdp as torch.distributed.checkpoint (DCP) shards in last/optimizer/, one
file per rank: written as DCP writes them, read without running pickled code. DCP's metadata goes through an
allow-list of its own record classes, and only tensors are read. Imported only by a sharded run (sharding.py).
"""

import pickle

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import StorageMeta

from .errors import UserError


def write_shards(state: dict, path):
    """Each rank writes its part of the tensors of `state` into the DCP folder `path`."""
    dcp.save(state, storage_writer=dcp.FileSystemWriter(path, sync_files=True))


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

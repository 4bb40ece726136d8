"""Checkpoints with torch.distributed.checkpoint: every rank writes its own shards (sharded
embeddings, dense parameters, both optimizers' states, balancer state, data position,
step, metric states) into a temporary directory that rank 0 renames into place only after
every rank has finished, so a crash mid-save never leaves a checkpoint that loads half.
Loading never unpickles arbitrary objects: tensors go through torch.load(weights_only=True)
and DCP's pickled metadata file through an allow-list unpickler."""
from __future__ import annotations

import io
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

STEP_DIR = re.compile(r"^step-(\d{9})$")
COMPLETE = "COMPLETE"


class UnsafeCheckpointError(ValueError):
    """A checkpoint's metadata names a class outside the allow-list."""


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the classes DCP metadata is made of."""

    SAFE_BUILTINS = {"set", "frozenset", "slice", "bytearray", "complex"}

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("torch.distributed.checkpoint.") or module.startswith("torch.distributed._shard."):
            return super().find_class(module, name)
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))):
            return getattr(torch, name)
        if (module, name) == ("torch.serialization", "_get_layout"):  # maps a layout's name to torch.layout
            return super().find_class(module, name)
        if module == "pathlib" and name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"):
            return super().find_class(module, name)  # the checkpoint id DCP records
        if module == "collections" and name == "OrderedDict":
            return super().find_class(module, name)
        if module == "builtins" and name in self.SAFE_BUILTINS:
            return super().find_class(module, name)
        raise UnsafeCheckpointError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")


class SafeFileSystemReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = _MetadataUnpickler(io.BytesIO(stream.read())).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    """`DIR/step-000000120/` directories; the newest complete one is resumed from."""

    def __init__(self, directory: Path, keep: int) -> None:
        self.directory = directory
        self.keep = keep

    def complete_checkpoints(self) -> list[tuple[int, Path]]:
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            match = STEP_DIR.match(path.name)
            if match and (path / COMPLETE).is_file() and (path / ".metadata").is_file():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Collective: every rank calls it with its own state."""
        final = self.directory / f"step-{step:09d}"
        tmp = self.directory / f".tmp-step-{step:09d}"
        if _is_main():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        dcp.save(state, storage_writer=FileSystemWriter(tmp))
        _barrier()
        if _is_main():
            (tmp / COMPLETE).write_text(f"{step}\n")
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for _, old in self.complete_checkpoints()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return final

    def load_latest(self, state: dict[str, Any]) -> int | None:
        """Load the newest complete checkpoint in place into `state`; returns its step. A
        checkpoint that fails to load (e.g. truncated files) is skipped for the previous one."""
        candidates = self.complete_checkpoints()
        for step, path in reversed(candidates):
            ok = torch.tensor([1], dtype=torch.int32)
            try:
                dcp.load(state, storage_reader=SafeFileSystemReader(path))
            except UnsafeCheckpointError:
                raise
            except (Exception, CheckpointException) as err:  # noqa: BLE001 - any unreadable one falls back
                print(f"recbalance: checkpoint {path} could not be loaded ({type(err).__name__}: {err}); "
                      "trying the previous one", flush=True)
                ok[0] = 0
            if dist.is_initialized():
                dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            if ok[0]:
                return step
        return None

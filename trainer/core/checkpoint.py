"""Checkpoints with torch.distributed.checkpoint (DCP): every rank writes its own shards
(sharded embeddings, dense parameters, both optimizers' states, balancer state, data
position, step, metric states) into a temporary directory that rank 0 renames into place
only after every rank has finished, so a crash mid-save never leaves a checkpoint that
loads half.

Loading runs no code from the checkpoint. DCP unpickles two things: the `.metadata` file
(plain `pickle.load`) and entries declared as pickled bytes (`torch.load(weights_only=False)`
in its default load planner). Here the metadata goes through an unpickler that resolves
exactly the (module, name) pairs DCP metadata is made of, nothing dotted, and must declare
only tensors stored in files of its own directory; our state has no byte entries, so a
checkpoint declaring one is refused, and the planner refuses to unpickle bytes at all.
Tensors are read by DCP with `torch.load(weights_only=True)`.

A checkpoint that asks for anything else, or that does not fit the configured model, stops
the run untouched (`CheckpointRefusedError`); one that merely fails to read (truncated
files) is set aside as `step-N.unreadable` and the previous one is tried."""
from __future__ import annotations

import importlib
import io
import pickle
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import ReadItem

from balancing.distributed import is_distributed

STEP_DIR = re.compile(r"^step-(\d{9})$")
COMPLETE = "COMPLETE"
METADATA = ".metadata"
PER_RANK_KEY = re.compile(r"^rank\d+\.")  # per-rank metric state: absent when the world size changed

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {(_DCP_METADATA, name) for name in ("Metadata", "TensorStorageMetadata", "TensorProperties",
                                        "ChunkStorageMetadata", "MetadataIndex", "StorageMeta",
                                        "_MEM_FORMAT_ENCODING")}
    | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
       ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath")}
    | {("torch", name) for name, value in vars(torch).items() if isinstance(value, torch.dtype)}
)
"""Every global a DCP `.metadata` of our state refers to: its dataclasses, torch.Size, the
dtypes, layouts (by name, through `_get_layout`) and the checkpoint id (a path)."""

_WHAT_IT_IS = {
    (_DCP_METADATA, "BytesStorageMetadata"):
        "an entry of pickled Python objects, which DCP would unpickle with torch.load(weights_only=False); "
        "recbalance never writes one",
}


class CheckpointRefusedError(ValueError):
    """A checkpoint the run must not load: the run stops and leaves it as it is."""


class UnsafeCheckpointError(CheckpointRefusedError):
    """A checkpoint asks for something outside the allow-list (tampered, or not ours)."""


class CheckpointMismatchError(CheckpointRefusedError):
    """A readable checkpoint of a different model, method or length than the config."""


def _refused(checkpoint: Path, request: str, file: Path | None = None) -> UnsafeCheckpointError:
    """The error for a checkpoint that asks for `request`, naming the file it came from."""
    return UnsafeCheckpointError(
        f"checkpoint {file or checkpoint} asks for {request}: it was not written by recbalance (tampered?), so "
        f"it was not loaded, and it is left in place for inspection. Move {checkpoint} away to resume from "
        "the previous checkpoint, or start fresh (`recbalance train --fresh`)."
    )


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves exactly the (module, name) pairs of ALLOWED_GLOBALS; anything else, a dotted
    name such as `os.system` under an allowed module included, is refused."""

    def __init__(self, file: io.BytesIO, source: Path) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            what = _WHAT_IT_IS.get((module, name), "which checkpoint metadata never refers to")
            raise _refused(self.source.parent, f"{module}.{name} ({what})", self.source)
        return getattr(importlib.import_module(module), name)

    def persistent_load(self, pid: Any) -> Any:
        raise _refused(self.source.parent, f"a persistent object {pid!r}", self.source)


def read_metadata(directory: Path) -> Metadata:
    """`directory/.metadata` unpickled with the allow-list and checked: a Metadata of tensor
    entries only, each stored in a file of `directory` itself."""
    file = directory / METADATA
    metadata = _MetadataUnpickler(io.BytesIO(file.read_bytes()), file).load()
    if not isinstance(metadata, Metadata):
        raise _refused(directory, f"a {type(metadata).__name__} instead of DCP metadata", file)
    for key, entry in metadata.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata):
            raise _refused(directory, f"entry {key!r} as a {type(entry).__name__}, not a tensor", file)
    for info in (metadata.storage_data or {}).values():
        path = getattr(info, "relative_path", None)
        plain_name = isinstance(path, str) and Path(path).name == path and path not in ("", ".", "..")
        if not isinstance(info, _StorageInfo) or not plain_name:
            raise _refused(directory, f"data at {path!r}, outside its own directory", file)
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader, serving metadata checked by `read_metadata` (also when DCP asks for
    a rank-local `__N.metadata`, which it would otherwise unpickle as is)."""

    def __init__(self, path: Path, metadata: Metadata) -> None:
        super().__init__(path)
        self._metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if getattr(self._metadata, "storage_meta", None) is None:
            self._metadata.storage_meta = StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


class TensorOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's planner, except that it never unpickles a byte entry (DCP's would, with
    torch.load(weights_only=False))."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise UnsafeCheckpointError(f"entry {read_item.dest_index.fqn!r} as pickled bytes")


Shapes = dict[str, Optional[tuple[int, ...]]]


def state_shapes(state: dict[str, Any]) -> Shapes:
    """DCP's flattened keys of `state` with each tensor's global shape (None: not a tensor)."""
    flat, _ = flatten_state_dict(state)
    return {key: tuple(value.size()) if hasattr(value, "size") else None for key, value in flat.items()}


def all_ranks_shapes(state: dict[str, Any]) -> Shapes:
    """Collective: the union of every rank's `state_shapes` (each rank holds the optimizer
    state of its own embedding shards only), i.e. the keys of the whole checkpoint."""
    shapes = state_shapes(state)
    if not is_distributed():
        return shapes
    gathered: list[Shapes | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, shapes)
    return {key: shape for part in gathered for key, shape in (part or {}).items()}


def mismatches(shapes: Shapes, metadata: Metadata) -> list[str]:
    """Keys of the run's state missing from the checkpoint, keys only the checkpoint has, and
    tensors of another shape; per-rank keys may differ (the world size may change)."""
    theirs = metadata.state_dict_metadata
    found = []
    for key in sorted(set(shapes) | set(theirs)):
        if PER_RANK_KEY.match(key):
            continue
        if key not in theirs:
            found.append(f"{key} (not in the checkpoint)")
        elif key not in shapes:
            found.append(f"{key} (only in the checkpoint)")
        elif shapes[key] is not None and shapes[key] != tuple(theirs[key].size):
            found.append(f"{key} (shape {list(theirs[key].size)} in the checkpoint, {list(shapes[key])} here)")
    return found


def _causes(err: BaseException) -> list[BaseException]:
    """The errors behind `err`: DCP wraps every rank's error in a CheckpointException."""
    if isinstance(err, CheckpointException):
        return [exc for exc, _ in err.failures.values()]
    return [err]


def _refusal_inside(err: BaseException) -> str | None:
    """What a shard asked for when our planner or torch's weights-only unpickler refused it
    inside DCP."""
    for exc in _causes(err):
        if isinstance(exc, UnsafeCheckpointError):
            return str(exc)
        if isinstance(exc, pickle.UnpicklingError):  # torch.load(weights_only=True) refused a pickled global
            said = re.search(r"[^\n]*\bGLOBAL\b[^\n]*", str(exc))  # the line naming the global
            what = said.group(0).strip() if said else _first_line(exc)
            return f"something outside torch's weights-only allow-list ({what})"
    return None


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


OK, UNREADABLE, MISMATCH, UNSAFE = range(4)  # outcomes of a load attempt, worst last


def _attempt(action: Callable[[], Any], directory: Path) -> tuple[int, str]:
    """Run one step of loading; classify what went wrong (this rank only)."""
    try:
        action()
        return OK, ""
    except UnsafeCheckpointError as err:
        return UNSAFE, str(err)
    except CheckpointMismatchError as err:
        return MISMATCH, str(err)
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - every other failure means unreadable
        refusal = _refusal_inside(err)
        if refusal is not None:
            return UNSAFE, str(_refused(directory, refusal))
        return UNREADABLE, _first_line(_causes(err)[0])


def _agree(outcome: tuple[int, str]) -> tuple[int, str]:
    """The worst outcome over all ranks, so every rank takes the same branch."""
    if not is_distributed():
        return outcome
    gathered: list[tuple[int, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, outcome)
    return max(gathered, key=lambda o: o[0])  # type: ignore[arg-type,return-value]


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _free_name(path: Path) -> Path:
    """`path`, or `path.1`, `path.2` ... whichever does not exist yet."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


class CheckpointManager:
    """`DIR/step-000000120/` directories; the newest complete one is resumed from.

    Only this run's checkpoints are ever pruned or replaced: the ones it wrote and, when it
    resumed, the ones up to the step it resumed from (the run it continues)."""

    def __init__(self, directory: Path, keep: int) -> None:
        self.directory = directory
        self.keep = keep
        self.own_steps: set[int] = set()

    def complete_checkpoints(self) -> list[tuple[int, Path]]:
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            match = STEP_DIR.match(path.name)
            if match and (path / COMPLETE).is_file() and (path / METADATA).is_file():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Collective: every rank calls it with its own state."""
        final = self.directory / f"step-{step:09d}"
        tmp = self.directory / f".tmp-step-{step:09d}"
        if final.exists() and step not in self.own_steps:
            raise CheckpointRefusedError(f"{final} exists and was not written by this run; not replacing it")
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
        self.own_steps.add(step)
        if _is_main():
            own = [path for s, path in self.complete_checkpoints() if s in self.own_steps]
            for old in own[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return final

    def set_aside_all(self) -> Path | None:
        """Collective: move every complete checkpoint into `DIR/previous-<UTC time>/` (a run
        that starts fresh never deletes what an earlier run wrote); returns that folder."""
        found = self.complete_checkpoints()
        target = self.directory / time.strftime("previous-%Y%m%dT%H%M%SZ", time.gmtime())
        if found and _is_main():
            target = _free_name(target)
            target.mkdir()
            for _, path in found:
                path.rename(target / path.name)
        _barrier()
        return target if found else None

    def load_latest(self, state: dict[str, Any]) -> int | None:
        """Collective: load the newest complete checkpoint in place into `state`; returns its
        step (None when there is none). One that fails to read is set aside and the previous
        one tried; one that is unsafe or does not fit `state` raises CheckpointRefusedError."""
        candidates = self.complete_checkpoints()
        shapes = all_ranks_shapes(state)
        for step, path in reversed(candidates):
            loaded: list[Metadata] = []
            code, message = _agree(_attempt(lambda: loaded.append(self._checked_metadata(path, shapes)), path))
            if code == OK:
                reader = SafeFileSystemReader(path, loaded[0])
                # the keys were checked: only per-rank metric state may be absent
                planner = TensorOnlyLoadPlanner(allow_partial_load=True)
                code, message = _agree(_attempt(lambda: dcp.load(state, storage_reader=reader, planner=planner), path))
            if code == OK:
                self.own_steps |= {s for s, _ in candidates if s <= step}
                return step
            if code == UNSAFE:
                raise UnsafeCheckpointError(message)
            if code == MISMATCH:
                raise CheckpointMismatchError(message)
            self._set_aside_unreadable(path, message)
        if candidates:
            raise CheckpointRefusedError(
                f"none of the {len(candidates)} checkpoint(s) in {self.directory} could be loaded (each is kept as "
                "step-N.unreadable, see above) and this run's state is now partly overwritten; rerun to start from "
                "step 0, or rename one back to step-N to retry it"
            )
        return None

    def _checked_metadata(self, path: Path, shapes: Shapes) -> Metadata:
        """`read_metadata`, refusing a checkpoint whose keys or shapes differ from `shapes`."""
        metadata = read_metadata(path)
        found = mismatches(shapes, metadata)
        if found:
            shown = "; ".join(found[:6]) + (f"; and {len(found) - 6} more" if len(found) > 6 else "")
            raise CheckpointMismatchError(
                f"checkpoint {path} does not fit this config (another model, method or data schema): {shown}. "
                "Nothing was loaded, changed or deleted. To continue that run, use the config it was trained with; "
                "to start a new one, use a new --output-dir, or pass --fresh (checkpoint.resume = false), which "
                f"moves the existing checkpoints to {self.directory}/previous-<time>/ and starts at step 0."
            )
        return metadata

    def _set_aside_unreadable(self, path: Path, reason: str) -> None:
        """Collective: rename a checkpoint that failed to load so that it is kept, never
        overwritten, and no longer resumed from."""
        target = _free_name(path.with_name(f"{path.name}.unreadable"))
        if _is_main():
            path.rename(target)
            print(f"recbalance: checkpoint {path} could not be loaded ({reason}); kept as {target.name}, "
                  "trying the previous one", flush=True)
        _barrier()

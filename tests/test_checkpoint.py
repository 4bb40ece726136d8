"""Checkpoints: interrupted-and-resumed equals uninterrupted; a truncated checkpoint falls
back to the previous one; metadata is never unpickled beyond an allow-list."""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import pytest
import torch

from tests.distributed_util import run_ranks
from tests.test_sharded_equivalence import tiny_config
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

from trainer.core.checkpoint import (
    CheckpointManager, CheckpointMismatchError, CheckpointRefusedError, TensorOnlyLoadPlanner, UnsafeCheckpointError,
    _MetadataUnpickler,
)

STEPS = 12


def _flat_state(trainer) -> dict[str, torch.Tensor]:
    """This rank's parameters and optimizer state as plain tensors (local shards)."""
    out = {}
    for prefix, state in (("model", trainer.model.state_dict()), ("optim", trainer.optimizer.state_dict())):
        stack = [(prefix, state)]
        while stack:
            key, value = stack.pop()
            if isinstance(value, dict):
                stack.extend((f"{key}/{k}", v) for k, v in value.items())
            elif hasattr(value, "local_shards"):
                for shard in value.local_shards():
                    out[f"{key}@{shard.metadata.shard_offsets}"] = shard.tensor.detach().clone()
            elif isinstance(value, torch.Tensor):
                out[key] = value.detach().clone()
    return out


def train_segment(config: dict, out_dir: str, until: int | None) -> dict:
    from trainer.config import config_from_dict
    from trainer.run.distributed import init_distributed, shutdown_distributed
    from trainer.core.trainer import Trainer

    torch.set_num_threads(1)
    env = init_distributed()
    trainer = Trainer(config_from_dict(config), env, Path(out_dir))
    trainer.fit(until_step=until)
    path = trainer.save_checkpoint()
    inode = path.stat().st_ino
    again = trainer.save_checkpoint()  # the same step: kept as it is, not written again
    result = {"step": trainer.step, "examples": trainer.examples_seen, "resumed_from": trainer.resumed_from,
              "saved_once": again == path and again.stat().st_ino == inode,
              "stream": trainer.stream.state_dict(), "state": _flat_state(trainer)}
    shutdown_distributed()
    return result


def config_for(data: Path) -> dict:
    config = tiny_config(data, "table_wise", "mmoe", "multibalance")
    config["data"]["shuffle"] = True
    config["train"].update(steps=STEPS, embedding_optimizer="rowwise_adagrad")
    return config


def test_interrupted_and_resumed_equals_uninterrupted(tiny_dataset, tmp_path):
    config = config_for(tiny_dataset)
    whole = run_ranks(train_segment, 2, config, str(tmp_path / "whole"), None)
    first = run_ranks(train_segment, 2, config, str(tmp_path / "split"), 5)
    assert first[0]["step"] == 5
    second = run_ranks(train_segment, 2, config, str(tmp_path / "split"), None)
    for rank in (0, 1):
        a, b = whole[rank], second[rank]
        assert b["resumed_from"] == 5
        assert a["saved_once"] and b["saved_once"]
        assert (b["step"], b["examples"], b["stream"]) == (a["step"], a["examples"], a["stream"]) == (
            STEPS, STEPS * 64, a["stream"])
        assert a["state"].keys() == b["state"].keys()
        assert any(k.endswith("balancer._extra_state/lambdas") for k in a["state"]), "balancer state not compared"
        for key in a["state"]:
            assert torch.allclose(a["state"][key].float(), b["state"][key].float(), rtol=1e-5, atol=1e-7), key


def test_truncated_checkpoint_falls_back_to_previous(tiny_dataset, tmp_path):
    config = config_for(tiny_dataset)
    run_ranks(train_segment, 2, config, str(tmp_path), 4)
    run_ranks(train_segment, 2, config, str(tmp_path), 8)
    newest = tmp_path / "checkpoints" / "step-000000008"
    assert newest.is_dir() and (tmp_path / "checkpoints" / "step-000000004").is_dir()
    for shard in newest.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    resumed = run_ranks(train_segment, 2, config, str(tmp_path), 9)
    assert resumed[0]["resumed_from"] == 4
    assert resumed[0]["step"] == 9
    assert (tmp_path / "checkpoints" / "step-000000008.unreadable").is_dir()  # kept, both ranks agreed


def test_keep_prunes_old_checkpoints_and_ignores_incomplete(tiny_dataset, tmp_path):
    config = config_for(tiny_dataset)
    config["checkpoint"] = {"every": 2, "keep": 2}
    (tmp_path / "checkpoints" / ".tmp-step-000000099").mkdir(parents=True)  # a crash mid-save
    (tmp_path / "checkpoints" / "step-000000099").mkdir()  # renamed but without COMPLETE marker
    run_ranks(train_segment, 2, config, str(tmp_path), 6)
    complete = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if (p / "COMPLETE").exists())
    assert complete == ["step-000000004", "step-000000006"]


# ---------------------------------------------------------------------------------------------
# Tampered checkpoints, in one process (DCP without a process group), with real payloads
# ---------------------------------------------------------------------------------------------

def small_state(value: float) -> dict:
    return {"model": {"w": torch.full((3, 2), value)}, "progress": {"step": torch.tensor(int(value))}}


@pytest.fixture
def two_checkpoints(tmp_path) -> Path:
    """DIR with step-000000004 and step-000000008, written by the real CheckpointManager."""
    manager = CheckpointManager(tmp_path, keep=2)
    manager.save(4, small_state(4.0))
    manager.save(8, small_state(8.0))
    return tmp_path


def _short(text: str) -> bytes:
    data = text.encode()
    return pickle.SHORT_BINUNICODE + bytes([len(data)]) + data


def dotted_global_pickle(module: str, command: str) -> bytes:
    """Protocol 4: the global `module` + `os.system` (a dotted name resolved by getattr from
    the allowed module, which imports os), called with `command`."""
    return (pickle.PROTO + b"\x04" + _short(module) + _short("os.system") + pickle.STACK_GLOBAL
            + _short(command) + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP)


class RunsCommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def declare_bytes_entry(checkpoint: Path, key: str, command: str) -> Path:
    """Rewrite `.metadata` from allowed classes only, declaring `key` as BytesStorageMetadata
    stored in a torch.save'd file whose unpickling runs `command`; returns that file."""
    metadata = pickle.loads((checkpoint / ".metadata").read_bytes())  # our own file, written just now
    evil = checkpoint / "evil.distcp"
    buffer = io.BytesIO()
    torch.save(RunsCommand(command), buffer)
    evil.write_bytes(buffer.getvalue())
    metadata.state_dict_metadata[key] = BytesStorageMetadata()
    metadata.storage_data[MetadataIndex(key)] = _StorageInfo(evil.name, 0, len(buffer.getvalue()))
    (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))
    return evil


def _tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_dotted_global_in_metadata_is_refused_not_run(two_checkpoints):
    newest = two_checkpoints / "step-000000008"
    marker = two_checkpoints / "pwned"
    payload = dotted_global_pickle("torch.distributed.checkpoint.filesystem", f"touch {marker}")
    (newest / ".metadata").write_bytes(payload)
    before = _tree(two_checkpoints)
    with pytest.raises(UnsafeCheckpointError) as err:
        CheckpointManager(two_checkpoints, keep=1).load_latest(small_state(0.0))
    assert not marker.exists()
    assert str(newest / ".metadata") in str(err.value)
    assert "torch.distributed.checkpoint.filesystem.os.system" in str(err.value)
    assert _tree(two_checkpoints) == before  # nothing loaded from, renamed or deleted


def test_bytes_entry_in_metadata_is_refused_not_unpickled(two_checkpoints):
    newest = two_checkpoints / "step-000000008"
    marker = two_checkpoints / "pwned"
    declare_bytes_entry(newest, "progress.step", f"touch {marker}")
    before = _tree(two_checkpoints)
    state = small_state(0.0)
    with pytest.raises(UnsafeCheckpointError) as err:
        CheckpointManager(two_checkpoints, keep=1).load_latest(state)
    assert not marker.exists()
    assert str(newest / ".metadata") in str(err.value) and "BytesStorageMetadata" in str(err.value)
    assert _tree(two_checkpoints) == before
    assert float(state["model"]["w"][0, 0]) == 0.0  # the refused checkpoint loaded nothing


def test_planner_never_unpickles_bytes(tmp_path):
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save(RunsCommand(f"touch {marker}"), buffer)
    buffer.seek(0)
    item = ReadItem(LoadItemType.BYTE_IO, MetadataIndex("progress.step"), [0], MetadataIndex("progress.step"), [0], [0])
    with pytest.raises(UnsafeCheckpointError):
        TensorOnlyLoadPlanner().load_bytes(item, buffer)
    assert not marker.exists()


def test_truncated_checkpoint_is_kept_aside_and_the_previous_one_loads(two_checkpoints, capsys):
    newest = two_checkpoints / "step-000000008"
    for shard in newest.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    truncated = _tree(newest)
    state = small_state(0.0)
    assert CheckpointManager(two_checkpoints, keep=1).load_latest(state) == 4
    assert float(state["model"]["w"][0, 0]) == 4.0
    assert "step-000000008 could not be loaded" in capsys.readouterr().out
    assert _tree(two_checkpoints / "step-000000008.unreadable") == truncated  # kept, out of the way


def test_shard_asking_for_a_global_is_refused_not_run(two_checkpoints):
    newest = two_checkpoints / "step-000000008"
    marker = two_checkpoints / "pwned"
    metadata = pickle.loads((newest / ".metadata").read_bytes())
    index = next(i for i in metadata.storage_data if i.fqn == "model.w")
    info = metadata.storage_data[index]
    buffer = io.BytesIO()
    torch.save(RunsCommand(f"touch {marker}"), buffer)
    shard = newest / info.relative_path
    offset = shard.stat().st_size
    shard.write_bytes(shard.read_bytes() + buffer.getvalue())  # a well-formed shard entry, pointed at below
    metadata.storage_data[index] = _StorageInfo(info.relative_path, offset, len(buffer.getvalue()))
    (newest / ".metadata").write_bytes(pickle.dumps(metadata))
    before = _tree(two_checkpoints)
    with pytest.raises(UnsafeCheckpointError) as err:
        CheckpointManager(two_checkpoints, keep=1).load_latest(small_state(0.0))
    assert not marker.exists()
    assert str(newest) in str(err.value) and "GLOBAL posix.system" in str(err.value)
    assert _tree(two_checkpoints) == before


def test_when_no_checkpoint_loads_the_run_stops(two_checkpoints):
    for shard in two_checkpoints.glob("step-*/*.distcp"):
        shard.write_bytes(b"")
    with pytest.raises(CheckpointRefusedError, match="none of the 2 checkpoint"):
        CheckpointManager(two_checkpoints, keep=1).load_latest(small_state(0.0))
    assert sorted(p.name for p in two_checkpoints.iterdir()) == [
        "step-000000004.unreadable", "step-000000008.unreadable"]


def test_checkpoint_of_another_model_is_refused_naming_the_keys(two_checkpoints):
    before = _tree(two_checkpoints)
    other = {"model": {"w": torch.zeros(4, 2), "v": torch.zeros(1)}, "progress": {"step": torch.tensor(0)}}
    with pytest.raises(CheckpointMismatchError) as err:
        CheckpointManager(two_checkpoints, keep=1).load_latest(other)
    message = str(err.value)
    assert "model.w (shape [3, 2] in the checkpoint, [4, 2] here)" in message
    assert "model.v (not in the checkpoint)" in message and "--fresh" in message
    assert _tree(two_checkpoints) == before


def test_keep_never_prunes_a_checkpoint_this_run_did_not_write(two_checkpoints):
    manager = CheckpointManager(two_checkpoints, keep=1)  # did not resume: step-4 and step-8 are not its own
    manager.save(12, small_state(12.0))
    manager.save(16, small_state(16.0))
    names = sorted(p.name for p in two_checkpoints.iterdir())
    assert names == ["step-000000004", "step-000000008", "step-000000016"]


def test_metadata_unpickler_refuses_arbitrary_objects(tmp_path):
    with pytest.raises(UnsafeCheckpointError, match="builtins.print"):
        _MetadataUnpickler(io.BytesIO(pickle.dumps(Printer())), tmp_path / ".metadata").load()


class Printer:
    def __reduce__(self):
        return (print, ("owned",))

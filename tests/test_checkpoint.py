"""Checkpoints: interrupted-and-resumed equals uninterrupted; a truncated checkpoint falls
back to the previous one; metadata is never unpickled beyond an allow-list."""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import pytest
import torch

from tests.distributed_util import run_ranks
from tests.test_sharded_equivalence import tiny_config
from trainer.checkpoint import UnsafeCheckpointError, _MetadataUnpickler

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
    from trainer.distributed import init_distributed, shutdown_distributed
    from trainer.loop import Trainer

    torch.set_num_threads(1)
    env = init_distributed()
    trainer = Trainer(config_from_dict(config), env, Path(out_dir))
    trainer.fit(until_step=until)
    trainer.save_checkpoint()
    result = {"step": trainer.step, "examples": trainer.examples_seen, "resumed_from": trainer.resumed_from,
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


def test_keep_prunes_old_checkpoints_and_ignores_incomplete(tiny_dataset, tmp_path):
    config = config_for(tiny_dataset)
    config["checkpoint"] = {"every": 2, "keep": 2}
    (tmp_path / "checkpoints" / ".tmp-step-000000099").mkdir(parents=True)  # a crash mid-save
    (tmp_path / "checkpoints" / "step-000000099").mkdir()  # renamed but without COMPLETE marker
    run_ranks(train_segment, 2, config, str(tmp_path), 6)
    complete = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if (p / "COMPLETE").exists())
    assert complete == ["step-000000004", "step-000000006"]


class Exploit:
    def __reduce__(self):
        return (print, ("owned",))


def test_metadata_unpickler_refuses_arbitrary_objects():
    with pytest.raises(UnsafeCheckpointError, match="builtins.print"):
        _MetadataUnpickler(io.BytesIO(pickle.dumps(Exploit()))).load()

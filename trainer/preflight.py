"""Checks run before any process starts training, so a bad config or a missing data set
fails in seconds with a message that names the key."""
from __future__ import annotations

from pathlib import Path

from trainer.build import build_balancer
from trainer.config import Config, ConfigError
from trainer.data.schema import Schema
from trainer.distributed import resolve_device
from trainer.loop import local_batch_size


def preflight(cfg: Config, world_size: int) -> Schema:
    schema_path = Path(cfg.data.path) / "schema.json"
    if not schema_path.exists():
        raise ConfigError(
            f"config key 'data.path': {cfg.data.path!r} holds no schema.json; build a data set with "
            f"`recbalance data census|synthetic|convert --output {cfg.data.path}`"
        )
    schema = Schema.load(schema_path)
    try:
        build_balancer(cfg, len(schema.labels))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    resolve_device(cfg.train.device, world_size)
    local_batch_size(cfg.data.global_batch_size, world_size, "data.global_batch_size")
    local_batch_size(cfg.data.eval_batch_size, world_size, "data.eval_batch_size")
    return schema

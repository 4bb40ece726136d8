"""Checks run before any process starts training, so a bad config, a missing or unreadable
data set, or tables too large for the machine fail in seconds with a message that names the
key, the file or the table."""
from __future__ import annotations

import os
from pathlib import Path

from trainer.core.factory import build_balancer, check_method, schema_tables
from trainer.config import Config, ConfigError
from trainer.data.reader import ParquetReader
from trainer.data.schema import Schema
from trainer.run.distributed import resolve_device
from trainer.core.trainer import local_batch_size
from trainer.core.parallel import check_tables_fit


def preflight(cfg: Config, world_size: int) -> Schema:
    """Check `cfg` for a run of `world_size` ranks on this machine; returns the schema."""
    schema_path = Path(cfg.data.path) / "schema.json"
    if not schema_path.exists():
        raise ConfigError(
            f"config key 'data.path': {cfg.data.path!r} holds no schema.json; build a data set with "
            f"`recbalance data census|synthetic|convert --output {cfg.data.path}`"
        )
    schema = Schema.load(schema_path)
    check_method(cfg)
    resolve_device(cfg.train.device, world_size)
    train_batch = local_batch_size(cfg.data.global_batch_size, world_size, "data.global_batch_size")
    eval_batch = local_batch_size(cfg.data.eval_batch_size, world_size, "data.eval_batch_size")
    check_splits(cfg, schema, world_size, train_batch, eval_batch)
    try:
        build_balancer(cfg, schema)  # its options, bound to the data set's tasks
    except ValueError as err:
        raise ConfigError(str(err)) from None
    check_tables_fit(schema_tables(schema), world_size, available_memory(), str(schema_path))
    return schema


def check_splits(cfg: Config, schema: Schema, world_size: int, train_batch: int, eval_batch: int) -> None:
    """Index every split the run reads (footers only), as the ranks will: a missing, empty or
    unreadable split, a file that does not match the schema, or too few rows for a batch
    raises the DataError a rank would raise later."""
    splits = {"train": (train_batch, True), cfg.data.eval_split: (eval_batch, False)}
    if cfg.train.eval_every:
        splits.setdefault("valid", (eval_batch, False))
    for split, (batch, is_train) in splits.items():
        ParquetReader(
            Path(cfg.data.path), schema, split, batch, 0, world_size, shuffle=cfg.data.shuffle and is_train,
            seed=cfg.train.seed, drop_last=is_train, prefetch=0, id_policy=cfg.data.id_policy,
            bad_rows=cfg.data.bad_rows,
        )


def available_memory() -> int:
    """Bytes of memory available to new allocations (MemAvailable; the physical memory where
    /proc/meminfo is missing)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")

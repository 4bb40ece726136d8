"""The single-process reference the distributed tests compare against: the global batch of
a step is rank 0's local batch followed by rank 1's, read with the same reader."""
from __future__ import annotations

import copy
from typing import Iterator

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from trainer.data.batch import Batch
from trainer.data.reader import ParquetReader
from trainer.data.schema import Schema


def concat_kjt(kjts: list[KeyedJaggedTensor]) -> KeyedJaggedTensor:
    """Stack local batches' sparse features into one global batch (KJT.concat joins keys)."""
    keys = kjts[0].keys()
    per_key = [k.to_dict() for k in kjts]
    values, lengths = [], []
    for key in keys:
        for d in per_key:
            values.append(d[key].values())
            lengths.append(d[key].lengths())
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths))


def global_batches(cfg, schema: Schema, world_size: int = 2) -> Iterator[Batch]:
    """Global training batches as `world_size` unshuffled ranks would see them together."""
    local = cfg.data.global_batch_size // world_size
    streams = [
        ParquetReader(cfg.data.path, schema, "train", local, rank, world_size, shuffle=False,
                      seed=cfg.train.seed, drop_last=True).epoch(0)
        for rank in range(world_size)
    ]
    while True:
        parts = [next(s) for s in streams]
        batch = copy.copy(parts[0])
        batch.dense = torch.cat([p.dense for p in parts])
        batch.sparse = concat_kjt([p.sparse for p in parts])
        batch.labels = torch.cat([p.labels for p in parts], dim=1)
        batch.weights = torch.cat([p.weights for p in parts])
        yield batch

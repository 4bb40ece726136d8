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


def tiny_config(data, sharding: str = "table_wise", kind: str = "mmoe", method: str = "equal",
                steps: int = 4, options: dict | None = None) -> dict:
    """A tiny model on the tiny data set, SGD embeddings (the fused kernel equals torch's SGD)."""
    return {
        "data": {"path": str(data), "global_batch_size": 64, "eval_batch_size": 64, "shuffle": False, "prefetch": 1},
        "model": {"kind": kind, "dense_layers": [8], "cross_layers": 1, "cross_rank": 4,
                  "shared_layers": [16], "num_experts": 2, "expert_layers": [8], "tower_layers": [4]},
        "sharding": {"type": sharding},
        "train": {"steps": steps, "seed": 3, "embedding_optimizer": "sgd", "embedding_lr": 0.5, "dense_lr": 0.01},
        "balance": {"method": method, "options": options or {}},
    }


def sharded_trainer(config: dict, out_name: str = "out"):
    """This rank's real Trainer (call inside a launched rank), starting from the seed's full
    tables so that it matches `reference_model` exactly."""
    from pathlib import Path

    from trainer.core.factory import build
    from trainer.config import config_from_dict
    from trainer.run.distributed import init_distributed
    from trainer.core.trainer import Trainer
    from trainer.core.parallel import copy_full_embeddings

    cfg = config_from_dict(config)
    torch.set_num_threads(1)
    env = init_distributed()
    trainer = Trainer(cfg, env, Path(cfg.data.path) / out_name)
    torch.manual_seed(cfg.train.seed)
    copy_full_embeddings(trainer.model, build(cfg, trainer.schema).model.state_dict())
    return trainer


def reference_model(config: dict):
    """(cfg, schema, unsharded model, [embedding SGD, dense Adam]) in this process."""
    from pathlib import Path

    from trainer.core.factory import build
    from trainer.config import config_from_dict

    cfg = config_from_dict(config)
    schema = Schema.load(Path(cfg.data.path) / "schema.json")
    torch.manual_seed(cfg.train.seed)
    model = build(cfg, schema).model
    embedding = [p for n, p in model.named_parameters() if "embedding_bag_collection" in n]
    dense = [p for n, p in model.named_parameters() if "embedding_bag_collection" not in n]
    optimizers = [torch.optim.SGD(embedding, lr=cfg.train.embedding_lr),
                  torch.optim.Adam(dense, lr=cfg.train.dense_lr)]
    return cfg, schema, model, optimizers


def reference_steps(model, optimizers, batches: Iterator[Batch], steps: int) -> Iterator[torch.Tensor]:
    """Plain single-process training: forward, the balancer's loss, ONE backward, step.
    Yields each step's per-task losses [M]; the caller reads any state it compares."""
    from trainer.core.trainer import task_losses

    for _ in range(steps):
        batch = next(batches)
        losses = task_losses(model(batch.dense, batch.sparse), batch)
        for optimizer in optimizers:
            optimizer.zero_grad()
        model.balancer.loss(losses).backward()
        for optimizer in optimizers:
            optimizer.step()
        yield losses.detach()

"""Model parallelism: TorchRec's planner decides where each embedding table lives, DMP
shards the tables and wraps the dense part in data parallelism, and the embedding
optimizer is fused into the backward kernels."""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed import comm_ops
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingType
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from trainer.data.errors import DataError
from trainer.run.distributed import DistEnv

SHARDING_TYPES = {
    "table_wise": [ShardingType.TABLE_WISE.value],
    "row_wise": [ShardingType.ROW_WISE.value],
    "column_wise": [ShardingType.COLUMN_WISE.value],
    # The planner chooses among the model-parallel layouts; data-parallel tables are
    # excluded because they would bypass the fused optimizer.
    "auto": [
        ShardingType.TABLE_WISE.value,
        ShardingType.ROW_WISE.value,
        ShardingType.COLUMN_WISE.value,
        ShardingType.TABLE_ROW_WISE.value,
    ],
}

class EmbeddingBagSharder(EmbeddingBagCollectionSharder):
    """TorchRec's sharder, with row-wise layouts also offered on CPU: TorchRec 1.8 lists
    them for CUDA only, though the fused CPU kernels and gloo run them."""

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = super().sharding_types(compute_device_type)
        extra = [ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value]
        return types + [t for t in extra if t not in types]


SHARDERS = [EmbeddingBagSharder()]

EMBEDDING_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "rowwise_adagrad": RowWiseAdagrad,
}


def model_tables(model: nn.Module) -> list[Any]:
    """The embedding tables of a model's (unsharded) embedding-bag collections, as the planner sees them."""
    return [
        table
        for module in model.modules()
        if hasattr(module, "embedding_bag_configs")
        for table in module.embedding_bag_configs()
    ]


def check_tables_fit(tables: list[Any], local_ranks: int, available_bytes: int, schema_file: str) -> None:
    """Every local rank builds the whole model, each embedding table in float32, before
    TorchRec shards it; raise a DataError naming the largest tables and the memory they need
    when `local_ranks` copies do not fit into `available_bytes`."""
    sizes = sorted(((t.num_embeddings * t.embedding_dim * 4, t) for t in tables), key=lambda item: -item[0])
    need = local_ranks * sum(size for size, _ in sizes)
    if need <= available_bytes:
        return
    largest = "; ".join(f"'{t.name}': {t.num_embeddings:,} rows x {t.embedding_dim} dims = {_memory(size)}"
                        for size, t in sizes[:3])
    raise DataError(
        f"{schema_file}: the embedding tables need {_memory(need)} ({local_ranks} local rank(s) each build every "
        f"table in float32 before sharding), but this machine has {_memory(available_bytes)} available. Largest "
        f"tables: {largest}. Lower num_embeddings in the schema (ids beyond a table fold into it with "
        "data.id_policy = \"hash\"), or run fewer ranks per machine.",
        file=schema_file,
    )


def _memory(size: int) -> str:
    return f"{size / 2**30:,.1f} GiB ({size:,} bytes)"


def sum_allreduce_hook(process_group, bucket):  # no annotations: DDP checks them at runtime
    """DDP communication hook that SUMS gradients instead of averaging them.

    Each rank's loss is already scaled as (local sum)/(global batch), so the sum over ranks
    is the global-batch gradient, for the dense parameters here exactly as for the sharded
    embeddings, whose gradients TorchRec sums across ranks in its all-to-all."""
    group = process_group if process_group is not None else dist.group.WORLD
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def shard_model(
    model: nn.Module,
    env: DistEnv,
    sharding: str,
    embedding_optimizer: str,
    embedding_lr: float,
) -> DistributedModelParallel:
    """Fuse the embedding optimizer, plan the sharding over all ranks and wrap in DMP.

    Gradients are SUMMED over ranks, sparse and dense alike: TorchRec's division of the
    embedding gradients by the world size is switched off and DDP sums through
    sum_allreduce_hook. With each rank's loss scaled by 1/world_size (see Trainer), every
    gradient is that of the mean loss over the global batch, and each rank's gradient at
    the balance point holds exactly its rows of the global-batch gradient."""
    comm_ops.set_gradient_division(False)
    embedding_params = [p for m in model.modules() if hasattr(m, "embedding_bag_configs") for p in m.parameters()]
    apply_optimizer_in_backward(EMBEDDING_OPTIMIZERS[embedding_optimizer], embedding_params, {"lr": embedding_lr})
    constraints = {
        table.name: ParameterConstraints(sharding_types=SHARDING_TYPES[sharding], compute_kernels=["fused"])
        for table in model_tables(model)
    }
    topology = Topology(world_size=env.world_size, compute_device=env.device.type)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    plan = planner.collective_plan(model, SHARDERS, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(module=model, device=env.device, plan=plan, sharders=SHARDERS)
    ddp = dmp._dmp_wrapped_module
    if isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
        ddp.register_comm_hook(None, sum_allreduce_hook)
    return dmp


def sharding_plan_summary(dmp: DistributedModelParallel) -> dict[str, dict[str, Any]]:
    """Table name -> sharding type and owning ranks, as the planner decided."""
    summary: dict[str, dict[str, Any]] = {}
    for module_plan in dmp.plan.plan.values():
        for table, spec in module_plan.items():
            ranks = sorted({r for r in (spec.ranks or [])})
            summary[table] = {"sharding_type": spec.sharding_type, "ranks": ranks}
    return summary


def make_optimizer(dmp: DistributedModelParallel, dense_lr: float, weight_decay: float = 0.0,
                   exclude: Iterable[nn.Parameter] = ()) -> CombinedOptimizer:
    """The fused embedding optimizer (it already runs in the backward) and Adam for the dense
    parameters, except ``exclude`` (parameters another optimizer step owns, e.g. PUB's)."""
    skip = {id(p) for p in exclude}
    dense = {n: p for n, p in in_backward_optimizer_filter(dmp.named_parameters()) if id(p) not in skip}
    optimizers: list[Any] = [dmp.fused_optimizer]
    if dense:
        optimizers.append(KeyedOptimizerWrapper(
            dense, lambda params: torch.optim.Adam(params, lr=dense_lr, weight_decay=weight_decay)))
    return CombinedOptimizer(optimizers)


def copy_full_embeddings(dmp: DistributedModelParallel, full_state: dict[str, torch.Tensor]) -> None:
    """Write full (unsharded) embedding weights into this rank's shards, whatever the
    layout, so differently sharded runs can start from identical parameters."""
    for key, value in dmp.state_dict().items():
        shards: Iterable[Any] = value.local_shards() if hasattr(value, "local_shards") else []
        for shard in shards:
            (r0, c0), (rows, cols) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            with torch.no_grad():
                shard.tensor.copy_(full_state[key][r0 : r0 + rows, c0 : c0 + cols])

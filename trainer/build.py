"""Turn a data set's schema and the run config into the model to train."""
from __future__ import annotations

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

from balancing import Balancer, TaskInfo, make_balancer
from models.drgrad import DRGradRanker
from models.ranker import MultiTaskRanker
from trainer.config import Config
from trainer.data.label_rates import label_rates
from trainer.data.schema import Schema


def table_name(feature: str) -> str:
    return f"t_{feature}"


def embedding_tables(schema: Schema) -> list[EmbeddingBagConfig]:
    """One table per sparse feature, sum-pooled (multi-hot lists pool into one vector)."""
    return [
        EmbeddingBagConfig(
            name=table_name(f.name),
            embedding_dim=f.embedding_dim,
            num_embeddings=f.num_embeddings,
            feature_names=[f.name],
            pooling=PoolingType.SUM,
        )
        for f in schema.sparse
    ]


def build_balancer(cfg: Config, num_tasks: int, process_group: object | None = None,
                   schema: Schema | None = None) -> Balancer:
    """The configured balancer; with ``schema``, bound to the data set's tasks (and their
    training label rates when the method asks for them)."""
    if cfg.balance.method == "drgrad":  # DRGrad is a model (split-MMoE) + its router
        if cfg.model.kind != "mmoe":
            raise ValueError(
                f"config key 'model.kind': {cfg.model.kind!r} is not allowed with balance.method='drgrad'; "
                "expected 'mmoe' (DRGrad builds its split-MMoE from the MMoE keys)"
            )
        if cfg.balance.level != "representation":
            raise ValueError(
                f"config key 'balance.level': {cfg.balance.level!r} is not allowed with balance.method='drgrad'; "
                "expected 'representation' (the router acts inside the backward pass)"
            )
    options = dict(cfg.balance.options)
    if process_group is not None:
        options["process_group"] = process_group
    balancer = make_balancer(cfg.balance.method, num_tasks, **options)
    if schema is not None:
        rates = label_rates(cfg.data.path, schema) if balancer.needs_label_rates else None
        balancer.bind_tasks(TaskInfo(tuple(schema.labels), rates))
    return balancer


def build_model(
    cfg: Config, schema: Schema, device: torch.device | None = None, point_balancer: Balancer | None = None
) -> MultiTaskRanker | DRGradRanker:
    """The model with the configured balancer at its balance point (or `point_balancer`).

    ``balance.method = "drgrad"`` selects DRGrad's split-MMoE (models/drgrad.py) built from
    the MMoE keys; ``"pub"`` balances parameter updates (balancing/methods/pub.py, PUBStep), so its model's
    balance point passes the plain sum (``equal``)."""
    spec = cfg.model
    if point_balancer is None and cfg.balance.method == "drgrad":
        balancer = build_balancer(cfg, len(schema.labels))
        balancer.resolve_primary(list(schema.labels))
        return DRGradRanker(
            tables=embedding_tables(schema), num_dense=len(schema.dense), num_tasks=len(schema.labels),
            spec=spec, balancer=balancer, device=device,
            personal_features=schema.personal_features if balancer.personal_gate else (),
        )
    if point_balancer is None and cfg.balance.method == "pub":
        point_balancer = make_balancer("equal", len(schema.labels))
    return MultiTaskRanker(
        tables=embedding_tables(schema),
        num_dense=len(schema.dense),
        num_tasks=len(schema.labels),
        spec=spec,
        balancer=point_balancer or build_balancer(cfg, len(schema.labels), schema=schema),
        device=device,
    )

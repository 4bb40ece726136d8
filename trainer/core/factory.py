"""The one place a run's parts are made from the config: the model with its balance point,
the balancer (bound to the data set's tasks), the parameter-level step when the method acts
on the shared parameters, and the optimizers. What a method needs it declares itself
(`Balancer.levels`, `Balancer.task_side`, `Balancer.parameter_step`); nothing here names a
method."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

from balancing import Balancer, TaskInfo, make_balancer
from balancing.parameter_level import ParameterLevelBalancing, own_rank_group
from balancing.registry import method_class
from models import drgrad as _drgrad  # noqa: F401  (registers the "split_mmoe" task side)
from models.ranker import build_ranker, task_side_base
from trainer.config import Config, ConfigError
from trainer.data.label_rates import label_rates
from trainer.data.schema import Schema


def table_name(feature: str) -> str:
    return f"t_{feature}"


def schema_tables(schema: Schema) -> list[EmbeddingBagConfig]:
    """One embedding table per sparse feature of the data set, sum-pooled (multi-hot lists pool
    into one vector)."""
    return [
        EmbeddingBagConfig(name=table_name(f.name), embedding_dim=f.embedding_dim, num_embeddings=f.num_embeddings,
                           feature_names=[f.name], pooling=PoolingType.SUM)
        for f in schema.sparse
    ]


def _method(cfg: Config) -> type[Balancer]:
    try:
        return method_class(cfg.balance.method)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def balance_level(cfg: Config) -> str:
    """The level the configured method acts at: `balance.level`, when the method supports it.
    A method that acts at one level only (PUB: the parameters) uses that one."""
    cls = _method(cfg)
    if len(cls.levels) == 1:
        return cls.levels[0]
    if cfg.balance.level not in cls.levels:
        raise ConfigError(f"config key 'balance.level': {cfg.balance.level!r} is not allowed with "
                          f"balance.method={cfg.balance.method!r}; allowed: {', '.join(map(repr, cls.levels))}")
    return cfg.balance.level


def check_method(cfg: Config) -> None:
    """The method's declared needs against the config (before any rank starts)."""
    balance_level(cfg)
    side = _method(cfg).task_side
    if side is not None and cfg.model.kind != task_side_base(side):
        raise ConfigError(
            f"config key 'model.kind': {cfg.model.kind!r} is not allowed with balance.method={cfg.balance.method!r}; "
            f"expected {task_side_base(side)!r} (the method's {side} task side is built from those keys)"
        )


def build_balancer(cfg: Config, schema: Schema, process_group: object | None = None) -> Balancer:
    """The configured balancer, bound to the data set's tasks (and their training label rates
    when the method asks for them)."""
    extra = {} if process_group is None else {"process_group": process_group}
    balancer = make_balancer(cfg.balance.method, len(schema.labels), **cfg.balance.options, **extra)
    rates = label_rates(cfg.data.path, schema) if balancer.needs_label_rates else None
    balancer.bind_tasks(TaskInfo(tuple(schema.labels), rates))
    return balancer


@dataclass
class Built:
    """What a run trains: the (unsharded) model; the configured balancer, whichever level it
    acts at; and at the parameter level the step that applies it (None at the representation,
    where the balancer sits in the model's balance point)."""

    model: nn.Module
    balancer: Balancer
    parameter_level: ParameterLevelBalancing | None


def build(cfg: Config, schema: Schema, device: torch.device | None = None) -> Built:
    """The model, its balancer and, at the parameter level, the parameter step."""
    check_method(cfg)
    num_tasks = len(schema.labels)
    at_parameters = balance_level(cfg) == "parameters"
    # At the parameter level the balancer sees global-batch gradients already: its own group.
    balancer = build_balancer(cfg, schema, process_group=own_rank_group() if at_parameters else None)
    point = make_balancer("equal", num_tasks) if at_parameters else balancer
    model = build_ranker(
        type(balancer).task_side, tables=schema_tables(schema), num_dense=len(schema.dense), num_tasks=num_tasks,
        spec=cfg.model, balancer=point, personal_features=schema.personal_features, device=device,
    )
    step = None
    if at_parameters:
        step = type(balancer).parameter_step(model.shared_dense_parameters(), balancer, lr=cfg.train.dense_lr,
                                             weight_decay=cfg.train.weight_decay)
    return Built(model, balancer, step)

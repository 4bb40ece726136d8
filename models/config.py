"""The model's architecture keys: the ``[model]`` section of a run config, used as they are
by the models (one definition, so a key added here reaches both)."""
from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

ModelKind = Literal["mmoe", "shared_bottom", "ple"]
MODEL_KINDS: tuple[str, ...] = typing.get_args(ModelKind)


@dataclass
class ModelConfig:
    """`[model]`: the shared bottom (dense MLP, DCNv2 cross layers, shared MLP) and the task
    side: "shared_bottom" (one tower per task on the representation), "mmoe" (``num_experts``
    experts, one gate per task) or "ple" (``ple_layers`` extraction layers, each with
    ``num_experts`` shared experts and ``task_experts`` experts per task)."""

    kind: ModelKind = "mmoe"
    dense_layers: list[int] = field(default_factory=lambda: [64, 32])
    cross_layers: int = 2
    cross_rank: int = 16
    shared_layers: list[int] = field(default_factory=lambda: [128, 64])
    num_experts: int = 4
    expert_layers: list[int] = field(default_factory=lambda: [64])
    tower_layers: list[int] = field(default_factory=lambda: [32])
    task_experts: int = 1
    ple_layers: int = 1
    # DRGrad's split-MMoE: PPNet gate on the shared input where the schema names personal features
    personal_gate: bool = True

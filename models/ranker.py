"""A multi-task ranking model: sparse + dense -> DCNv2 interaction -> shared task-side
tensors -> balance point -> one head per task."""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from balancing import Balancer, BalancePoint
from models.arches import DenseArch, InteractionDCNArch, SparseArch
from models.config import MODEL_KINDS, ModelConfig
from models.heads import MMoEHeads, PLEHeads, SharedBottomHeads


class MultiTaskRanker(nn.Module):
    """Everything upstream of `balance_point` is shared and receives only the balanced
    gradient; each task's head reads only its own copy of the shared tensors."""

    #: True for a task side that reads the schema's personal features (`build_ranker` passes them)
    uses_personal_features = False

    def __init__(
        self,
        tables: list[EmbeddingBagConfig],
        num_dense: int,
        num_tasks: int,
        spec: ModelConfig,
        balancer: Balancer,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if spec.kind not in MODEL_KINDS:
            raise ValueError(f"model.kind {spec.kind!r} is not allowed; allowed: {', '.join(MODEL_KINDS)}")
        if num_tasks < 2:
            raise ValueError(f"a multi-task model needs at least 2 tasks, got {num_tasks}")
        self.num_tasks = num_tasks
        self.sparse_arch = SparseArch(tables, device=device)
        self.dense_arch = DenseArch(num_dense, spec.dense_layers)
        self.interaction = InteractionDCNArch(
            self.dense_arch.out_features + self.sparse_arch.out_features,
            spec.cross_layers,
            spec.cross_rank,
            spec.shared_layers,
        )
        self.heads = self.make_heads(self.interaction.out_features, num_tasks, spec)
        self.balance_point = self.make_balance_point(balancer)

    def make_heads(self, width: int, num_tasks: int, spec: ModelConfig) -> nn.Module:
        """The task side over the interaction's output; a model with another task side
        overrides this (as TorchRec's DLRM_DCN swaps DLRM's interaction)."""
        if spec.kind == "mmoe":
            return MMoEHeads(width, num_tasks, spec.num_experts, spec.expert_layers, spec.tower_layers)
        if spec.kind == "ple":
            return PLEHeads(width, num_tasks, spec.num_experts, spec.task_experts, spec.ple_layers,
                            spec.expert_layers, spec.tower_layers)
        return SharedBottomHeads(width, num_tasks, spec.tower_layers)

    def make_balance_point(self, balancer: Balancer) -> nn.Module:
        return BalancePoint(balancer)

    @property
    def balancer(self) -> Balancer:
        return self.balance_point.balancer

    def bottom(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled embeddings [B, sum of dims] in `SparseArch.feature_names` order, interaction output h)."""
        dense_x = self.dense_arch(dense)
        sparse_x = self.sparse_arch(sparse)
        return sparse_x, self.interaction(dense_x, sparse_x)

    def shared(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> tuple[torch.Tensor, ...]:
        """The tensors all task modules read (for MMoE: expert outputs and gate input)."""
        return self.heads.shared(self.bottom(dense, sparse)[1])

    def task_logits(self, shared_copies: tuple[tuple[torch.Tensor, ...], ...]) -> torch.Tensor:
        return torch.stack([self.heads.task(m, shared_copies[m]) for m in range(self.num_tasks)])

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """Logits [M, B]."""
        return self.task_logits(self.balance_point(self.shared(dense, sparse)))

    def shared_dense_parameters(self) -> Iterator[nn.Parameter]:
        """Dense parameters upstream of the balance point (the 'parameter level')."""
        yield from self.dense_arch.parameters()
        yield from self.interaction.parameters()
        yield from self.heads.upstream_parameters()


#: task sides a balancing method can ask for (`Balancer.task_side`): name -> (model class,
#: the `model.kind` whose keys it is built from)
TASK_SIDES: dict[str, tuple[type[MultiTaskRanker], str]] = {}


def register_task_side(name: str, base_kind: str) -> Callable[[type[MultiTaskRanker]], type[MultiTaskRanker]]:
    """Class decorator: a `MultiTaskRanker` subclass available as task side ``name``."""

    def deco(cls: type[MultiTaskRanker]) -> type[MultiTaskRanker]:
        TASK_SIDES[name] = (cls, base_kind)
        return cls

    return deco


def task_side_base(name: str) -> str:
    """The `model.kind` task side ``name`` is built from."""
    if name not in TASK_SIDES:
        raise ValueError(f"task side {name!r} is not known; known: {', '.join(sorted(TASK_SIDES))}")
    return TASK_SIDES[name][1]


def build_ranker(task_side: str | None, *, tables: list[EmbeddingBagConfig], num_dense: int, num_tasks: int,
                 spec: ModelConfig, balancer: Balancer, personal_features: Sequence[str] = (),
                 device: torch.device | None = None) -> MultiTaskRanker:
    """The model for ``spec``, or with the task side a balancing method asks for."""
    cls = MultiTaskRanker if task_side is None else TASK_SIDES[task_side][0]
    extra = {"personal_features": personal_features} if cls.uses_personal_features else {}
    return cls(tables, num_dense, num_tasks, spec, balancer, device=device, **extra)

"""DRGrad's model: split-MMoE (the paper's Fig. 1(b) and Fig. 2) with the PPNet-style
personalised gate, composed from `MultiTaskRanker`'s bottom and MMoE's experts, gate mixing
and towers. The router and updater are `balancing.methods.drgrad`; the readings of the paper:
docs/methods.md.

    h -> experts;  v1 = gate_mix(gate_dedicated(h)),  vs = gate_mix(gate_shared(h))
    vs <- 2 · vs ⊗ sigmoid(W · v_ppnet)            with personal features (W, bias start at 0)
    DRGradPoint(v1, vs)                             the router, in the one backward pass
    primary: μ'·T1'(v1) + μ''·T1''(vs) (Eq. 8);  secondary task k: T_k(vs)
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from balancing import Balancer, DRGrad, DRGradPoint
from models.heads import Experts, Tower, gate_mix
from models.config import ModelConfig
from models.ranker import MultiTaskRanker, register_task_side


def feature_slices(tables: list[EmbeddingBagConfig], feature_names: list[str]) -> dict[str, tuple[int, int]]:
    """Column range of each feature in `SparseArch`'s output (the pooled embeddings
    concatenated in ``feature_names`` order): per-feature access without a second lookup."""
    dims = {name: t.embedding_dim for t in tables for name in t.feature_names}
    out, offset = {}, 0
    for name in feature_names:
        out[name] = (offset, offset + dims[name])
        offset += dims[name]
    return out


class SplitMMoEHeads(nn.Module):
    """Shared experts; the primary's own gate mixes v1 and one shared gate mixes vs; towers
    T1' (``tower_dedicated``, on v1) and one per task on vs (T1'' at the primary)."""

    def __init__(
        self, in_features: int, num_tasks: int, num_experts: int, expert_layers: list[int], tower_layers: list[int]
    ) -> None:
        super().__init__()
        self.experts = Experts(in_features, num_experts, expert_layers)
        self.gate_dedicated = nn.Linear(in_features, num_experts)
        self.gate_shared = nn.Linear(in_features, num_experts)
        self.tower_dedicated = Tower(expert_layers[-1], tower_layers)
        self.towers = nn.ModuleList(Tower(expert_layers[-1], tower_layers) for _ in range(num_tasks))

    def split(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(v1, vs) [B, D] each."""
        experts = self.experts(h)
        return gate_mix(self.gate_dedicated(h), experts), gate_mix(self.gate_shared(h), experts)

    def upstream_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters before the router (experts and both gates)."""
        yield from self.experts.parameters()
        yield from self.gate_dedicated.parameters()
        yield from self.gate_shared.parameters()


@register_task_side("split_mmoe", base_kind="mmoe")
class DRGradRanker(MultiTaskRanker):
    """`MultiTaskRanker` with the split-MMoE task side and DRGrad's balance point (module
    docstring); the same interface (``forward -> logits [M, B]``, ``balancer``,
    ``balance_point``, ``shared_dense_parameters()``)."""

    uses_personal_features = True

    def __init__(
        self,
        tables: list[EmbeddingBagConfig],
        num_dense: int,
        num_tasks: int,
        spec: ModelConfig,
        balancer: DRGrad,
        personal_features: Sequence[str] = (),
        device: torch.device | None = None,
    ) -> None:
        if not isinstance(balancer, DRGrad):
            raise ValueError(f"DRGradRanker needs the 'drgrad' balancer, got {type(balancer).__name__}")
        if balancer.primary_index is None:
            raise ValueError("DRGradRanker: bind the balancer to the data set's tasks (Balancer.bind_tasks) first")
        super().__init__(tables, num_dense, num_tasks, spec, balancer, device)
        self.primary = balancer.primary_index
        self.slices = feature_slices(tables, self.sparse_arch.feature_names)
        unknown = [f for f in personal_features if f not in self.slices]
        if unknown:
            raise ValueError(f"personal feature(s) {unknown} are not sparse features of the data set")
        self.personal_features = list(personal_features) if spec.personal_gate else []
        self.ppnet: nn.Linear | None = None
        if self.personal_features:
            width = sum(hi - lo for lo, hi in (self.slices[f] for f in self.personal_features))
            self.ppnet = nn.Linear(width, spec.expert_layers[-1])
            nn.init.zeros_(self.ppnet.weight)
            nn.init.zeros_(self.ppnet.bias)

    def make_heads(self, width: int, num_tasks: int, spec: ModelConfig) -> nn.Module:
        return SplitMMoEHeads(width, num_tasks, spec.num_experts, spec.expert_layers, spec.tower_layers)

    def make_balance_point(self, balancer: Balancer) -> nn.Module:
        return DRGradPoint(balancer)  # type: ignore[arg-type]  (checked in __init__)

    def split_inputs(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(v1, vs): the primary's dedicated input and the (personalised) shared input."""
        sparse_x, h = self.bottom(dense, sparse)
        v1, vs = self.heads.split(h)
        if self.ppnet is not None:
            personal = torch.cat([sparse_x[:, slice(*self.slices[f])] for f in self.personal_features], dim=1)
            vs = 2.0 * vs * torch.sigmoid(self.ppnet(personal))
        return v1, vs

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """Logits [M, B]."""
        v1, shared = self.balance_point(*self.split_inputs(dense, sparse))
        logits = [tower(vs) for tower, vs in zip(self.heads.towers, shared)]
        logits[self.primary] = self.balancer.aggregate(self.heads.tower_dedicated(v1), logits[self.primary])
        return torch.stack(logits)

    def shared_dense_parameters(self) -> Iterator[nn.Parameter]:
        """Dense parameters upstream of the router (they receive the routed gradients)."""
        yield from super().shared_dense_parameters()
        if self.ppnet is not None:
            yield from self.ppnet.parameters()

"""DRGrad's model: split-MMoE with a PPNet-style personalised gate (see balancing/drgrad.py for
the router and updater, docs/methods_pub_drgrad.md for every assumption).

    sparse + dense -> DCNv2 interaction -> h -> E shared experts [B, E, D]
      v1 = softmax(gate_1'(h)) · experts           dedicated input of the primary task
      vs = softmax(gate_s(h))  · experts           input shared by T1'' and the other towers
      vs <- 2 · vs ⊗ sigmoid(W · v_ppnet)           when the schema names personal features
      DRGradPoint(v1, vs)                            router in the one backward pass
      primary logit   = μ' · T1'(v1) + μ'' · T1''(vs)     (μ from the updater, not learned)
      secondary task k: logit = T_k(vs)

``v_ppnet`` is the concatenation of the pooled embeddings of the schema's
``personal_features`` (user id and similar), sliced per feature out of the sparse arch's
output (`feature_slices`). The gate's
W and bias start at zero, so the gate starts as the identity (2·sigmoid(0) = 1). With no
personal features (census) or ``personal_gate = false`` the gate is off. The μ mixing is of
the two towers' LOGITS (an assumption; see the docs).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.mlp import MLP
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from balancing import Balancer
from balancing.drgrad import DRGrad, DRGradPoint
from models.arches import DenseArch, InteractionDCNArch, SparseArch
from models.heads import Tower


def feature_slices(tables: list[EmbeddingBagConfig], feature_names: list[str]) -> dict[str, tuple[int, int]]:
    """Column range of each feature in `SparseArch`'s output (the concatenation of the pooled
    embeddings in ``feature_names`` order): per-feature access without a second lookup."""
    dims = {name: t.embedding_dim for t in tables for name in t.feature_names}
    out, offset = {}, 0
    for name in feature_names:
        out[name] = (offset, offset + dims[name])
        offset += dims[name]
    return out


class DRGradRanker(nn.Module):
    """Split-MMoE multi-task ranker trained with DRGrad (module docstring). Same interface as
    `MultiTaskRanker`: ``forward(dense, sparse) -> logits [M, B]``, ``balancer``,
    ``balance_point`` (with ``last_balance_seconds``), ``shared_dense_parameters()``."""

    def __init__(
        self,
        tables: list[EmbeddingBagConfig],
        num_dense: int,
        num_tasks: int,
        spec: object,
        balancer: DRGrad,
        personal_features: Sequence[str] = (),
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(balancer, DRGrad):
            raise ValueError(f"DRGradRanker needs the 'drgrad' balancer, got {type(balancer).__name__}")
        if balancer.primary_index is None:
            raise ValueError("DRGradRanker: resolve the primary task (DRGrad.resolve_primary) first")
        if num_tasks < 2:
            raise ValueError(f"a multi-task model needs at least 2 tasks, got {num_tasks}")
        self.num_tasks = num_tasks
        self.primary = balancer.primary_index
        self.sparse_arch = SparseArch(tables, device=device)
        self.dense_arch = DenseArch(num_dense, spec.dense_layers)
        self.interaction = InteractionDCNArch(
            self.dense_arch.out_features + self.sparse_arch.out_features,
            spec.cross_layers, spec.cross_rank, spec.shared_layers,
        )
        width, width_out = self.interaction.out_features, spec.expert_layers[-1]
        self.experts = nn.ModuleList(MLP(width, spec.expert_layers) for _ in range(spec.num_experts))
        self.gate_dedicated = nn.Linear(width, spec.num_experts)
        self.gate_shared = nn.Linear(width, spec.num_experts)
        self.slices = feature_slices(tables, self.sparse_arch.feature_names)
        dims = {name: hi - lo for name, (lo, hi) in self.slices.items()}
        unknown = [f for f in personal_features if f not in dims]
        if unknown:
            raise ValueError(f"personal feature(s) {unknown} are not sparse features of the data set")
        self.personal_features = list(personal_features) if balancer.personal_gate else []
        self.ppnet: nn.Linear | None = None
        if self.personal_features:
            self.ppnet = nn.Linear(sum(dims[f] for f in self.personal_features), width_out)
            nn.init.zeros_(self.ppnet.weight)
            nn.init.zeros_(self.ppnet.bias)
        self.tower_dedicated = Tower(width_out, spec.tower_layers)  # T1'
        self.towers = nn.ModuleList(Tower(width_out, spec.tower_layers) for _ in range(num_tasks))  # T1'' at primary
        self.balance_point = DRGradPoint(balancer)

    @property
    def balancer(self) -> Balancer:
        return self.balance_point.balancer

    def split_inputs(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(v1, vs): the primary's dedicated input and the (personalised) shared input."""
        sparse_x = self.sparse_arch(sparse)  # [B, sum of dims] in feature_names order
        h = self.interaction(self.dense_arch(dense), sparse_x)
        experts = torch.stack([expert(h) for expert in self.experts], dim=1)  # [B, E, D]
        mix = lambda gate: torch.bmm(torch.softmax(gate(h), dim=-1).unsqueeze(1), experts).squeeze(1)  # noqa: E731
        v1, vs = mix(self.gate_dedicated), mix(self.gate_shared)
        if self.ppnet is not None:
            personal = torch.cat([sparse_x[:, slice(*self.slices[f])] for f in self.personal_features], dim=1)
            vs = 2.0 * vs * torch.sigmoid(self.ppnet(personal))
        return v1, vs

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """Logits [M, B]."""
        v1, vs = self.split_inputs(dense, sparse)
        v1_t, vs_copies = self.balance_point(v1, vs)
        mu = self.balance_point.balancer.mu.to(dtype=v1.dtype, device=v1.device)
        logits = []
        for m in range(self.num_tasks):
            if m == self.primary:
                logits.append(mu[0] * self.tower_dedicated(v1_t) + mu[1] * self.towers[m](vs_copies[m]))
            else:
                logits.append(self.towers[m](vs_copies[m]))
        return torch.stack(logits)

    def shared_dense_parameters(self) -> Iterator[nn.Parameter]:
        """Dense parameters upstream of the router (they receive the routed gradients)."""
        yield from self.dense_arch.parameters()
        yield from self.interaction.parameters()
        yield from self.experts.parameters()
        yield from self.gate_dedicated.parameters()
        yield from self.gate_shared.parameters()
        if self.ppnet is not None:
            yield from self.ppnet.parameters()

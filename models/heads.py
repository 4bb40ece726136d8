"""Task-side modules. Each splits into a shared part (upstream of the balance point) and
the per-task part that reads only its own copy of the shared tensors."""
from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.mlp import MLP


class Tower(nn.Module):
    """One task's MLP ending in a single logit."""

    def __init__(self, in_features: int, layer_sizes: list[int]) -> None:
        super().__init__()
        self.mlp = MLP(in_features, layer_sizes)
        self.logit = nn.Linear(layer_sizes[-1], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logit(self.mlp(x)).squeeze(-1)


class SharedBottomHeads(nn.Module):
    """Shared-bottom multi-task learning: the representation feeds one tower per task."""

    def __init__(self, in_features: int, num_tasks: int, tower_layers: list[int]) -> None:
        super().__init__()
        self.towers = nn.ModuleList(Tower(in_features, tower_layers) for _ in range(num_tasks))

    def shared(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (h,)

    def task(self, m: int, shared: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.towers[m](shared[0])


class MMoEHeads(nn.Module):
    """Multi-gate mixture of experts (Ma et al., KDD 2018). Experts are shared; each task's
    gate mixes them from the gate input. The shared tensors are (expert outputs, gate input)."""

    def __init__(
        self, in_features: int, num_tasks: int, num_experts: int, expert_layers: list[int], tower_layers: list[int]
    ) -> None:
        super().__init__()
        self.experts = nn.ModuleList(MLP(in_features, expert_layers) for _ in range(num_experts))
        self.gates = nn.ModuleList(nn.Linear(in_features, num_experts) for _ in range(num_tasks))
        self.towers = nn.ModuleList(Tower(expert_layers[-1], tower_layers) for _ in range(num_tasks))

    def shared(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        experts = torch.stack([expert(h) for expert in self.experts], dim=1)  # [B, E, D]
        return experts, h

    def task(self, m: int, shared: tuple[torch.Tensor, ...]) -> torch.Tensor:
        experts, gate_input = shared
        gate = torch.softmax(self.gates[m](gate_input), dim=-1)  # [B, E]
        mixed = torch.bmm(gate.unsqueeze(1), experts).squeeze(1)  # [B, D]
        return self.towers[m](mixed)

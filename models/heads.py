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


class Experts(nn.ModuleList):
    """E expert MLPs over the same input; ``experts(h)`` stacks their outputs [B, E, D]."""

    def __init__(self, in_features: int, num_experts: int, layer_sizes: list[int]) -> None:
        super().__init__(MLP(in_features, layer_sizes) for _ in range(num_experts))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.stack([expert(h) for expert in self], dim=1)


def gate_mix(gate_logits: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """One gate's softmax mixture of the experts: logits [B, E], experts [B, E, D] -> [B, D]."""
    gate = torch.softmax(gate_logits, dim=-1)
    return torch.bmm(gate.unsqueeze(1), experts).squeeze(1)


class MMoEHeads(nn.Module):
    """Multi-gate mixture of experts (Ma et al., KDD 2018). Experts are shared; each task's
    gate mixes them from the gate input. The shared tensors are (expert outputs, gate input)."""

    def __init__(
        self, in_features: int, num_tasks: int, num_experts: int, expert_layers: list[int], tower_layers: list[int]
    ) -> None:
        super().__init__()
        self.experts = Experts(in_features, num_experts, expert_layers)
        self.gates = nn.ModuleList(nn.Linear(in_features, num_experts) for _ in range(num_tasks))
        self.towers = nn.ModuleList(Tower(expert_layers[-1], tower_layers) for _ in range(num_tasks))

    def shared(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.experts(h), h

    def task(self, m: int, shared: tuple[torch.Tensor, ...]) -> torch.Tensor:
        experts, gate_input = shared
        return self.towers[m](gate_mix(self.gates[m](gate_input), experts))

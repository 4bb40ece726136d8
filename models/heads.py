"""Task-side modules. Each splits into a shared part (upstream of the balance point) and
the per-task part that reads only its own copy of the shared tensors."""
from __future__ import annotations

from typing import Iterator

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

    def upstream_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the task side that sit before the balance point: none."""
        return iter(())

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

    def upstream_parameters(self) -> Iterator[nn.Parameter]:
        """The experts (every task's gate mixes them)."""
        return self.experts.parameters()

    def task(self, m: int, shared: tuple[torch.Tensor, ...]) -> torch.Tensor:
        experts, gate_input = shared
        return self.towers[m](gate_mix(self.gates[m](gate_input), experts))


class PLELayer(nn.Module):
    """One extraction layer: shared experts, ``task_experts`` experts per task, one gate per
    task over its own and the shared experts, and (except in the last layer) a shared gate
    over all of them."""

    def __init__(self, in_features: int, num_tasks: int, shared_experts: int, task_experts: int,
                 expert_layers: list[int], last: bool) -> None:
        super().__init__()
        self.shared_experts = Experts(in_features, shared_experts, expert_layers)
        self.task_experts = nn.ModuleList(Experts(in_features, task_experts, expert_layers) for _ in range(num_tasks))
        self.task_gates = nn.ModuleList(nn.Linear(in_features, task_experts + shared_experts) for _ in range(num_tasks))
        self.shared_gate = None if last else nn.Linear(in_features, num_tasks * task_experts + shared_experts)

    def task_output(self, m: int, x: torch.Tensor, shared_out: torch.Tensor) -> torch.Tensor:
        """Task m's mixture of its own experts (on its input x) and the shared experts' outputs."""
        return gate_mix(self.task_gates[m](x), torch.cat([self.task_experts[m](x), shared_out], dim=1))

    def forward(self, xs: list[torch.Tensor], x_shared: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(task inputs, shared input) -> (task outputs, shared output) of an inner layer."""
        assert self.shared_gate is not None, "the last layer's task side runs after the balance point"
        shared_out = self.shared_experts(x_shared)
        own = [experts(x) for experts, x in zip(self.task_experts, xs)]
        outs = [gate_mix(gate(x), torch.cat([e, shared_out], dim=1)) for gate, x, e in zip(self.task_gates, xs, own)]
        return outs, gate_mix(self.shared_gate(x_shared), torch.cat([*own, shared_out], dim=1))


class PLEHeads(nn.Module):
    """Progressive Layered Extraction (Tang et al., RecSys 2020: customized gate control with
    task-specific and shared experts). Inner layers are shared by every task (their task
    experts also feed the shared gate); in the last layer each task's gate reads its own
    input, its own experts and the shared experts. So the shared tensors, the balance
    point's inputs, are the last layer's shared expert outputs and the task inputs (one
    input, the interaction output, with a single layer)."""

    def __init__(self, in_features: int, num_tasks: int, shared_experts: int, task_experts: int, layers: int,
                 expert_layers: list[int], tower_layers: list[int]) -> None:
        super().__init__()
        width = expert_layers[-1]
        self.layers = nn.ModuleList(
            PLELayer(in_features if i == 0 else width, num_tasks, shared_experts, task_experts, expert_layers,
                     last=i == layers - 1)
            for i in range(layers)
        )
        self.towers = nn.ModuleList(Tower(width, tower_layers) for _ in range(num_tasks))
        self.num_tasks = num_tasks

    def shared(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        xs, x_shared = [h] * self.num_tasks, h
        for layer in self.layers[:-1]:
            xs, x_shared = layer(xs, x_shared)
        shared_out = self.layers[-1].shared_experts(x_shared)
        return (shared_out, h) if len(self.layers) == 1 else (shared_out, *xs)

    def task(self, m: int, shared: tuple[torch.Tensor, ...]) -> torch.Tensor:
        shared_out, *inputs = shared
        x = inputs[0] if len(inputs) == 1 else inputs[m]
        return self.towers[m](self.layers[-1].task_output(m, x, shared_out))

    def upstream_parameters(self) -> Iterator[nn.Parameter]:
        """Every inner layer and the last layer's shared experts."""
        for layer in self.layers[:-1]:
            yield from layer.parameters()
        yield from self.layers[-1].shared_experts.parameters()

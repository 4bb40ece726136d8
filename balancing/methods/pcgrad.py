"""`pcgrad`: gradient surgery (Yu et al., "Gradient Surgery for Multi-Task Learning", 2020).

For each task i, in a random order of the other tasks j: if g̃_i · g_j < 0 then
g̃_i <- g̃_i - (g̃_i · g_j / ||g_j||²) g_j; combined = sum_i g̃_i. Every g̃_i stays a linear
combination of the original gradients, g̃_i = sum_k A_ik g_k, and each dot product needed is
(A K)_ij with K the Gram, so the M x M mixing matrix A comes from the reduced Gram alone and
the combined gradient is (1ᵀA) applied to the LOCAL gradients. ``stats()["weights"]`` are
those effective multipliers 1ᵀA; the last mixing matrix is ``self.last_mixing``.
Task orders come from a generator seeded by (``seed``, step), identical on every rank.
Options: seed=0.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..base import GramBalancer
from ..options import check_int
from ..registry import register
from ..rng import step_generator


def task_orders(num_tasks: int, seed: int, step: int) -> list[list[int]]:
    """For every task i, a random permutation of the other tasks (deterministic in seed, step)."""
    gen = step_generator(seed, step)
    orders = []
    for i in range(num_tasks):
        others = [j for j in range(num_tasks) if j != i]
        perm = torch.randperm(len(others), generator=gen).tolist()
        orders.append([others[p] for p in perm])
    return orders


@register("pcgrad")
class PCGrad(GramBalancer):
    """PCGrad as a Gram-derived mixing matrix (see module docstring)."""

    def __init__(self, num_tasks: int, seed: int = 0, process_group: Optional[Any] = None) -> None:
        super().__init__(num_tasks, process_group)
        self.register_buffer("seed", torch.tensor(check_int("seed", seed, low=0), dtype=torch.long))
        self.last_mixing: Optional[torch.Tensor] = None

    def coefficients(self, gram: torch.Tensor) -> torch.Tensor:
        k = gram.detach().to("cpu", torch.float64)
        m = self.num_tasks
        mix = torch.eye(m, dtype=torch.float64)
        for i, order in enumerate(task_orders(m, int(self.seed), self.steps_done)):
            for j in order:
                dot = float(mix[i] @ k[:, j])
                if dot < 0 and float(k[j, j]) > 0:
                    mix[i, j] -= dot / float(k[j, j])
        self.last_mixing = mix.to(gram.device)
        return mix.sum(0).to(gram.device)

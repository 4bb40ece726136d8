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

from typing import Any, Dict, List, Optional

import torch

from ..base import GramBalancer
from ..gram import GramRows
from ..options import check_int
from ..registry import register
from ..rng import step_generator


def task_orders(num_tasks: int, seed: int, step: int) -> list[list[int]]:
    """For every task i, a random permutation of the other tasks (deterministic in seed, step).
    With two tasks there is nothing to permute and no generator is made."""
    if num_tasks <= 2:
        return [[j for j in range(num_tasks) if j != i] for i in range(num_tasks)]
    gen = step_generator(seed, step)
    orders = []
    for i in range(num_tasks):
        others = [j for j in range(num_tasks) if j != i]
        perm = torch.randperm(len(others), generator=gen).tolist()
        orders.append([others[p] for p in perm])
    return orders


class MixingBalancer(GramBalancer):
    """A projection method whose combined gradient is (1ᵀA) g for an M x M mixing matrix A
    built from the Gram; the last A is kept as rows of floats (`last_mixing` as a tensor)."""

    def __init__(self, num_tasks: int, seed: int = 0, process_group: Optional[Any] = None) -> None:
        super().__init__(num_tasks, process_group)
        self.register_buffer("seed", torch.tensor(check_int("seed", seed, low=0), dtype=torch.long))
        self._seed = int(self.seed)  # read once: a buffer read is a tensor op in the backward pass
        self._mixing: Optional[List[List[float]]] = None

    @property
    def last_mixing(self) -> Optional[torch.Tensor]:
        """The last mixing matrix A [M, M] (float64), None before the first step."""
        return None if self._mixing is None else torch.tensor(self._mixing, dtype=torch.float64)

    def _orders(self) -> list[list[int]]:
        return task_orders(self.num_tasks, self._seed, self.steps_done)

    def coefficient_values(self, gram: GramRows) -> List[float]:
        mix = self.mixing(gram)
        self._mixing = mix
        return [sum(row[j] for row in mix) for j in range(self.num_tasks)]

    def mixing(self, gram: GramRows) -> List[List[float]]:
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._seed = int(self.seed)


@register("pcgrad")
class PCGrad(MixingBalancer):
    """PCGrad as a Gram-derived mixing matrix (see module docstring)."""

    def mixing(self, gram: GramRows) -> List[List[float]]:
        m = self.num_tasks
        mix = [[1.0 if i == j else 0.0 for j in range(m)] for i in range(m)]
        for i, order in enumerate(self._orders()):
            row = mix[i]
            for j in order:
                dot = sum(row[t] * gram[t][j] for t in range(m))  # (A K)_ij = g̃_i · g_j
                if dot < 0 and gram[j][j] > 0:
                    row[j] -= dot / gram[j][j]
        return mix

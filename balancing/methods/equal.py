"""`equal`: the plain sum of the task gradients (what ``sum(losses).backward()`` does)."""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from ..base import Balancer, plain_sum
from ..gram import TaskGrad
from ..registry import register


@register("equal")
class Equal(Balancer):
    """Sum of the per-task gradients; weights = ones. Bitwise equal to summing the losses for
    two tasks (autograd's own accumulation order is used for nothing else)."""

    supports_pieces = True
    device_path = True

    def __init__(self, num_tasks: int, process_group: Optional[Any] = None) -> None:
        super().__init__(num_tasks, process_group)
        self._ones = torch.ones(num_tasks, dtype=torch.float64)

    def _combine(self, grads: Tuple[TaskGrad, ...]) -> TaskGrad:
        self._telemetry_gram(grads)
        self._last.weights = self._ones
        self._advance()
        return plain_sum(grads)

    def coefficient_tensor(self, gram: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(gram[0])

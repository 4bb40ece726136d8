"""`equal`: the plain sum of the task gradients (what ``sum(losses).backward()`` does)."""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..base import Balancer
from ..registry import register


@register("equal")
class Equal(Balancer):
    """Sum of the per-task gradients; weights = ones. Bitwise equal to summing the losses for
    two tasks (autograd's own accumulation order is used for nothing else)."""

    def __init__(self, num_tasks: int, process_group: Optional[Any] = None) -> None:
        super().__init__(num_tasks, process_group)

    def _combine(self, grads: torch.Tensor) -> torch.Tensor:
        self._global_gram(grads)  # telemetry only
        self._weights = torch.ones(self.num_tasks, dtype=torch.float64)
        self._advance()
        out = grads[0].clone()
        for m in range(1, self.num_tasks):  # task by task, as autograd accumulates (and faster than sum(0))
            out += grads[m]
        return out

"""`static`: fixed per-task weights, combined = sum_m w_m g_m."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch

from ..base import Balancer, weighted_sum
from ..gram import TaskGrad
from ..options import check_per_task
from ..registry import register


@register("static")
class Static(Balancer):
    """Fixed weights (option ``weights``: M finite numbers >= 0; default all ones)."""

    supports_pieces = True
    device_path = True

    def __init__(
        self,
        num_tasks: int,
        weights: Optional[Sequence[float]] = None,
        process_group: Optional[Any] = None,
    ) -> None:
        super().__init__(num_tasks, process_group)
        w = [1.0] * num_tasks if weights is None else check_per_task("weights", weights, num_tasks, low=0.0)
        self.weights = tuple(w)

    def _combine(self, grads: Tuple[TaskGrad, ...]) -> TaskGrad:
        self._telemetry_gram(grads)
        self._last.weights = self.weights
        self._advance()
        return weighted_sum(self.weights, grads)

    def coefficient_tensor(self, gram: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
        return self._constant("weights", self.weights, gram)

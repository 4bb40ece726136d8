"""`uncertainty`: homoscedastic-uncertainty loss weighting (Kendall, Gal & Cipolla, CVPR 2018).

Learned log-variances ``s_m`` (an ``nn.Parameter``, trained by the outer optimizer) weight the
losses in `loss()`:
  variant="full" (default): sum_m exp(-s_m) L_m + s_m
  variant="half":           sum_m ½ exp(-s_m) L_m + ½ s_m   (the regression form of the paper)
Both have the same stationary point s_m = log L_m; "half" has half the gradients. The
gradients reaching the balance point already carry exp(-s_m), so `combine` is the plain sum.
``stats()["weights"]`` reports the loss multipliers exp(-s_m) (times ½ for "half").
Note: ``s`` is an ordinary parameter; like any dense parameter, its gradient must be
averaged over the data-parallel ranks by the trainer.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import nn

from ..base import Balancer, plain_sum
from ..gram import TaskGrad
from ..options import check_choice, check_float
from ..registry import register


@register("uncertainty")
class Uncertainty(Balancer):
    """Learned log-variance weights in `loss()`; combine = sum (see module docstring)."""

    supports_pieces = True
    device_path = True

    def __init__(
        self,
        num_tasks: int,
        variant: str = "full",
        init: float = 0.0,
        process_group: Optional[Any] = None,
    ) -> None:
        super().__init__(num_tasks, process_group)
        self.variant = check_choice("variant", variant, ("full", "half"))
        init = check_float("init", init)
        self.log_vars = nn.Parameter(torch.full((num_tasks,), init))

    def loss_multipliers(self) -> torch.Tensor:
        """exp(-s) for "full", ½ exp(-s) for "half" (detached)."""
        mult = torch.exp(-self.log_vars.detach()).to(torch.float64)
        return mult if self.variant == "full" else 0.5 * mult

    def loss(self, losses: torch.Tensor) -> torch.Tensor:
        losses = self._check_losses(losses)
        s = self.log_vars.to(losses.dtype)
        total = torch.exp(-s) * losses + s
        return total.sum() if self.variant == "full" else 0.5 * total.sum()

    def _combine(self, grads: Tuple[TaskGrad, ...]) -> TaskGrad:
        self._telemetry_gram(grads)
        self._last.weights = self.loss_multipliers()
        self._advance()
        return plain_sum(grads)

    def coefficient_tensor(self, gram: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(gram[0])

    def reported_weights(self, coef: torch.Tensor) -> torch.Tensor:
        return self.loss_multipliers().to(coef.device)

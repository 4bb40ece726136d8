"""`dbmtl`: Dual-Balancing Multi-Task Learning (Lin et al., 2023).

Loss-scale balancing: `loss()` returns sum_m log(L_m + eps), so each task's gradient is
grad L_m / (L_m + eps). Gradient-magnitude balancing: every task's gradient is rescaled to
the largest (moving-average) gradient norm: combined = max_k ū_k * sum_m g_m / ||g_m||.
The paper keeps an EMA of the gradients themselves; at the representation level the rows
are different samples every step, so an EMA of gradients is meaningless and we keep an EMA
of the global-batch NORMS instead: ū <- beta_t ū + (1 - beta_t) n, beta_t = beta / t^beta_sigma
(t = 1, 2, ...), ū initialised to the first norms (the paper's zero start would shrink
the first steps). ``stats()["weights"]`` = max ū / n_m.
Distributed: log is not additive over ranks, so `loss()` all-reduces the M detached local
losses (partial sums of the global mean) and uses grad L_m / (L_global_m + eps) -- exactly
the gradient of log(L_global_m + eps). Options: beta=0.9, beta_sigma=0.0 (LibMTL defaults),
eps=1e-8.
"""
from __future__ import annotations

import math
from typing import Any, List, Optional

import torch

from ..base import GramBalancer
from ..distributed import all_reduce_sum
from ..gram import GramRows
from ..options import check_float
from ..registry import register


@register("dbmtl")
class DBMTL(GramBalancer):
    """DB-MTL with an EMA of norms (see module docstring). State: ``ema_norms``."""

    device_path = True

    def __init__(
        self,
        num_tasks: int,
        beta: float = 0.9,
        beta_sigma: float = 0.0,
        eps: float = 1e-8,
        process_group: Optional[Any] = None,
    ) -> None:
        super().__init__(num_tasks, process_group)
        self.beta = check_float("beta", beta, low=0.0, high=1.0)
        self.beta_sigma = check_float("beta_sigma", beta_sigma, low=0.0)
        self.eps = check_float("eps", eps, low=0.0)
        self.register_buffer("ema_norms", torch.zeros(num_tasks, dtype=torch.float64))

    def loss(self, losses: torch.Tensor) -> torch.Tensor:
        losses = self._check_losses(losses)
        global_losses = all_reduce_sum(losses.detach(), self.process_group) + self.eps
        value = torch.log(global_losses)
        return (value + (losses - losses.detach()) / global_losses).sum()

    def coefficient_tensor(self, gram: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
        (ema_norms,) = self._buffers_on(gram.device, "ema_norms")
        norms = gram.diagonal().clamp_min(0.0).sqrt()
        t = self.steps_done + 1
        if t == 1:
            ema = norms
        else:
            beta_t = self.beta / t**self.beta_sigma
            ema = beta_t * ema_norms + (1 - beta_t) * norms
        ema_norms.copy_(torch.where(finite, ema, ema_norms))
        return torch.where(norms > 0, ema.amax() / torch.where(norms > 0, norms, 1.0), 0.0)

    def coefficient_values(self, gram: GramRows) -> List[float]:
        norms = [math.sqrt(max(gram[i][i], 0.0)) for i in range(self.num_tasks)]
        t = self.steps_done + 1
        if t == 1:
            ema = norms
        else:
            beta_t = self.beta / t**self.beta_sigma
            ema = [beta_t * u + (1 - beta_t) * n for u, n in zip(self.ema_norms.tolist(), norms)]
        self.ema_norms.copy_(torch.tensor(ema, dtype=torch.float64))
        top = max(ema)
        return [top / n if n > 0 else 0.0 for n in norms]

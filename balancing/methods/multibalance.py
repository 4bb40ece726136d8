"""`multibalance`: Algorithm 3 of the MultiBalance paper (representation-level balancing).

Per step, with n_m = ||g_m|| over the global batch (sqrt of the reduced Gram diagonal):
  u_m <- (1 - gamma) u_m + gamma n_m          (EMA of norms; u initialised to the first n)
  v_m  = (u_m / n_m) g_m                      (0 when n_m = 0; ema=False: v_m = g_m)
  d_m  = cos(v_m, sum_j (lam_j + rho lam0_j) v_j)     direction="cosine" (paper §5.4), or
  d    = Vᵀ(V lam + rho V lam0)                        direction="gradient" (paper Eq. 12)
  lam <- Proj_simplex(lam - beta d)           (lam0 = uniform 1/M, lam initialised to lam0)
  combined = M * sum_m lam_m v_m              (×M: uniform lam without rescaling = plain sum)
Everything is a function of the Gram of v, diag(s) G diag(s) with s = u/n.
Defaults: beta=1.0, rho=0.1, gamma=0.01 (slow EMA: the norm scale drifts over ~100 steps),
ema=True, direction="cosine".
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..base import GramBalancer
from ..options import check_bool, check_choice, check_float
from ..registry import register
from ..simplex import project_simplex


@register("multibalance")
class MultiBalance(GramBalancer):
    """MultiBalance (see module docstring). State: ``ema_norms`` u, ``lambdas`` lam."""

    def __init__(
        self,
        num_tasks: int,
        beta: float = 1.0,
        rho: float = 0.1,
        gamma: float = 0.01,
        ema: bool = True,
        direction: str = "cosine",
        process_group: Optional[Any] = None,
    ) -> None:
        super().__init__(num_tasks, process_group)
        self.beta = check_float("beta", beta, low=0.0)
        self.rho = check_float("rho", rho, low=0.0)
        self.gamma = check_float("gamma", gamma, low=0.0, high=1.0)
        self.ema = check_bool("ema", ema)
        self.direction = check_choice("direction", direction, ("cosine", "gradient"))
        prior = torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64)
        self.register_buffer("prior", prior)
        self.register_buffer("lambdas", prior.clone())
        self.register_buffer("ema_norms", torch.zeros(num_tasks, dtype=torch.float64))

    def coefficients(self, gram: torch.Tensor) -> torch.Tensor:
        gram = gram.to(torch.float64)
        norms = gram.diagonal().clamp_min(0).sqrt()
        if self.ema:
            if int(self.step) == 0:
                u = norms.clone()
            else:
                u = (1 - self.gamma) * self.ema_norms.to(gram) + self.gamma * norms
            self.ema_norms.copy_(u)
            scale = torch.where(norms > 0, u / torch.where(norms > 0, norms, torch.ones_like(norms)),
                                torch.zeros_like(norms))
        else:
            scale = torch.ones_like(norms)
        gram_v = scale[:, None] * gram * scale[None, :]
        lam = self.lambdas.to(gram)
        mix = lam + self.rho * self.prior.to(gram)
        d = gram_v @ mix
        if self.direction == "cosine":
            v_norms = gram_v.diagonal().clamp_min(0).sqrt()
            mix_norm = (mix @ gram_v @ mix).clamp_min(0).sqrt()
            denom = v_norms * mix_norm
            d = torch.where(denom > 0, d / torch.where(denom > 0, denom, torch.ones_like(denom)),
                            torch.zeros_like(d))
        lam = project_simplex(lam - self.beta * d)
        self.lambdas.copy_(lam)
        return self.num_tasks * lam * scale

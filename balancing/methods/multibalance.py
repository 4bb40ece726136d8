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

import math
from typing import Any, List, Optional

import torch

from ..base import GramBalancer
from ..gram import GramRows
from ..options import check_bool, check_choice, check_float
from ..registry import register
from ..simplex import project_simplex_values


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

    def coefficient_values(self, g: GramRows) -> List[float]:
        # M x M arithmetic on plain floats: it runs inside every backward pass, where a dozen
        # tiny tensor operations would cost more than the Gram itself.
        m = self.num_tasks
        norms = [math.sqrt(max(g[i][i], 0.0)) for i in range(m)]
        if self.ema:
            if int(self.step) == 0:
                u = norms
            else:
                u = [(1 - self.gamma) * prev + self.gamma * n for prev, n in zip(self.ema_norms.tolist(), norms)]
            self.ema_norms.copy_(torch.tensor(u, dtype=torch.float64))
            scale = [ui / n if n > 0 else 0.0 for ui, n in zip(u, norms)]
        else:
            scale = [1.0] * m
        gram_v = [[scale[i] * g[i][j] * scale[j] for j in range(m)] for i in range(m)]
        lam = self.lambdas.tolist()
        mix = [lj + self.rho / m for lj in lam]  # lam + rho * lam0, lam0 = uniform (the `prior` buffer)
        d = [sum(gram_v[i][j] * mix[j] for j in range(m)) for i in range(m)]  # V_i . (V mix)
        if self.direction == "cosine":
            mix_norm = math.sqrt(max(sum(mj * dj for mj, dj in zip(mix, d)), 0.0))
            v_norms = [math.sqrt(max(gram_v[i][i], 0.0)) for i in range(m)]
            d = [di / (vn * mix_norm) if vn * mix_norm > 0 else 0.0 for di, vn in zip(d, v_norms)]
        lam = project_simplex_values([lj - self.beta * dj for lj, dj in zip(lam, d)])
        self.lambdas.copy_(torch.tensor(lam, dtype=torch.float64))
        return [m * lj * sj for lj, sj in zip(lam, scale)]

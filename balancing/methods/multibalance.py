"""`multibalance`: Algorithm 3 of the MultiBalance paper (representation-level balancing).

Per step k = 1, 2, ..., with n_m = ||g_m|| over the global batch (from the reduced Gram):
  u_m <- (1 - gamma_k) u_m + gamma_k n_m     (EMA of norms; ema=False: v = g)
             gamma_k = gamma / (1 - (1 - gamma)^k)   gamma_schedule="debiased": u is the
                       bias-corrected EMA (the mean of the norms so far while k < 1/gamma)
             gamma_k = 1 at k = 1, then gamma         gamma_schedule="constant": u starts at
                       the first norm and keeps it for ~1/gamma steps
  v_m  = (u_m / n_m) g_m
  d_m  = cos(v_m, V (lam + rho lam0))        direction="cosine" (§5.4) or d = Vᵀ V (lam + rho lam0) (Eq. 12)
  lam <- Proj_simplex(lam - beta d)          (lam starts at the prior lam0)
  combined = M sum_m lam_m v_m               (output="sum"; "average": sum_m lam_m v_m, the paper's)
Options: beta=0.001, rho=0.1, gamma=0.01, gamma_schedule="constant", ema=True,
direction="cosine", prior=None (uniform), output="sum". Algorithm 3 writes gamma_{k,m}, a
step size that may change with k, and gives no value or start for u; both schedules with
their measurements: docs/methods.md. The paper's beta (1.0 ads, 5.0 feeds) moves lam to its
fixed point within tens of steps; why the default is 1000x smaller: docs/methods.md too.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from ..base import GramBalancer
from ..device_linalg import project_simplex_tensor
from ..gram import GramRows
from ..options import check_bool, check_choice, check_float, check_per_task
from ..registry import register
from ..simplex import project_simplex_values

Numbers = Union[List[float], torch.Tensor]
OUTPUTS = ("sum", "average")
GAMMA_SCHEDULES = ("debiased", "constant")


def _simplex_point(name: str, value: Optional[Sequence[float]], num_tasks: int) -> List[float]:
    """Uniform for None, else M numbers >= 0 with a positive sum, scaled to sum 1."""
    if value is None:
        return [1.0 / num_tasks] * num_tasks
    weights = check_per_task(name, value, num_tasks, low=0.0)
    total = sum(weights)
    if not total > 0:
        raise ValueError(f"balance option {name!r} must have a positive sum (task preferences), got {value!r}")
    return [w / total for w in weights]


class _State:
    """MultiBalance's 2M numbers, checkpointed through `MultiBalance.get_extra_state`: plain
    floats on the host path, tensors on the gradients' device on the device path (each path
    converts what it finds; a plain object because it is written in every backward pass)."""

    __slots__ = ("lambdas", "ema_norms", "started")

    def __init__(self, prior: List[float]) -> None:
        self.lambdas: Numbers = list(prior)
        self.ema_norms: Optional[Numbers] = None  # None until the first step observes norms (host)
        self.started: Optional[torch.Tensor] = None  # device path: 0-d bool, EMA initialised

    def floats(self) -> None:
        """Host path: the state as lists of floats."""
        if isinstance(self.lambdas, torch.Tensor):
            started = bool(self.started)
            self.ema_norms = self.ema_norms.tolist() if started else None  # type: ignore[union-attr]
            self.lambdas, self.started = self.lambdas.tolist(), None

    def tensors(self, device: torch.device, num_tasks: int) -> None:
        """Device path: the state as float64 tensors on ``device`` (host-to-device copies only)."""
        if isinstance(self.lambdas, torch.Tensor):
            if self.lambdas.device != device:
                self.lambdas, self.ema_norms, self.started = (
                    t.to(device) for t in (self.lambdas, self.ema_norms, self.started)  # type: ignore[union-attr]
                )
            return
        self.started = torch.tensor(self.ema_norms is not None).to(device)
        self.ema_norms = torch.tensor(self.ema_norms or [0.0] * num_tasks, dtype=torch.float64).to(device)
        self.lambdas = torch.tensor(self.lambdas, dtype=torch.float64).to(device)


@register("multibalance")
class MultiBalance(GramBalancer):
    """MultiBalance (see module docstring). State: ``lambdas`` lam and ``ema_norms`` u, in
    ``state_dict()`` under ``_extra_state``."""

    device_path = True

    def __init__(
        self,
        num_tasks: int,
        beta: float = 0.001,
        rho: float = 0.1,
        gamma: float = 0.01,
        gamma_schedule: str = "constant",
        ema: bool = True,
        direction: str = "cosine",
        prior: Optional[Sequence[float]] = None,
        output: str = "sum",
        process_group: Optional[Any] = None,
    ) -> None:
        super().__init__(num_tasks, process_group)
        self.beta = check_float("beta", beta, low=0.0)
        self.rho = check_float("rho", rho, low=0.0)
        self.gamma = check_float("gamma", gamma, low=0.0, high=1.0)
        self.gamma_schedule = check_choice("gamma_schedule", gamma_schedule, GAMMA_SCHEDULES)
        self.ema = check_bool("ema", ema)
        self.direction = check_choice("direction", direction, ("cosine", "gradient"))
        self.prior = _simplex_point("prior", prior, num_tasks)
        self.output = check_choice("output", output, OUTPUTS)
        #: M·Σλv ("sum": uniform λ without rescaling is the plain sum) or Σλv ("average", the paper's)
        self._out_scale = float(num_tasks) if self.output == "sum" else 1.0
        self._state = _State(self.prior)

    def run_advice(self, total_steps: int) -> Optional[str]:
        """Whenever u rescales the gradients (ema on, gamma < 1): u lags norms that change, so the
        rescaling reweights tasks; on held-out data that cost NE at every run length measured,
        so no length is exempt (docs/methods.md, MultiBalance, "Run length")."""
        if not self.ema or self.gamma >= 1.0:
            return None
        memory = (f"{total_steps * self.gamma:.1f}x the ~{1.0 / self.gamma:.0f} steps its moving average of "
                  f"gradient norms remembers (1/gamma)" if self.gamma > 0 else
                  "and its moving average of gradient norms never forgets (gamma = 0)")
        return (f"multibalance: this run has {total_steps} steps, {memory}; while the tasks' gradient norms "
                f"change, that average lags them and reweights the tasks (the weights w in the progress lines "
                f"include it), which cost NE against equal weights on held-out data in short and long runs "
                f"alike; balance.options.ema = false turns it off (measured: docs/methods.md, MultiBalance, "
                f"\"Run length\")")

    @property
    def lambdas(self) -> torch.Tensor:
        """Current simplex weights lam [M] (float64, a host copy)."""
        return torch.as_tensor(self._state.lambdas, dtype=torch.float64).cpu().clone()

    @property
    def ema_norms(self) -> torch.Tensor:
        """EMA of the per-task gradient norms u [M] (float64, a host copy; zeros before step 1)."""
        state = self._state
        if state.ema_norms is None or (state.started is not None and not bool(state.started)):
            return torch.zeros(self.num_tasks, dtype=torch.float64)
        return torch.as_tensor(state.ema_norms, dtype=torch.float64).cpu().clone()

    def get_extra_state(self) -> Dict[str, torch.Tensor]:
        ema = self.ema_norms
        started = self._state.started
        return {
            "lambdas": self.lambdas,
            "ema_norms": ema,
            "ema_started": torch.tensor(
                bool(started) if started is not None else self._state.ema_norms is not None
            ),
        }

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or {"lambdas", "ema_norms", "ema_started"} - set(state):
            raise ValueError("multibalance: saved state needs 'lambdas', 'ema_norms' and 'ema_started'")
        lam, ema = state["lambdas"].tolist(), state["ema_norms"].tolist()
        if len(lam) != self.num_tasks or len(ema) != self.num_tasks:
            raise ValueError(
                f"multibalance: saved state is for {len(lam)} tasks, this balancer has {self.num_tasks}"
            )
        self._state.lambdas = [float(x) for x in lam]
        self._state.ema_norms = [float(x) for x in ema] if bool(state["ema_started"]) else None
        self._state.started = None

    def extra_stats(self) -> Dict[str, List[float]]:
        """λ (the simplex weights) and u (the norms' EMA): the effective weights of `stats()`
        are M·λ_m·u_m/‖g_m‖, so they also move with each step's gradient norms."""
        return {"lambdas": self.lambdas.tolist(), "ema_norms": self.ema_norms.tolist()}

    def gamma_at(self, k: int) -> float:
        """gamma_k, the EMA's step size at step k >= 1 (a host number: k is the host's step count)."""
        if k <= 1:
            return 1.0
        if self.gamma_schedule == "constant":
            return self.gamma
        if self.gamma == 0.0:
            return 1.0 / k  # the limit of gamma / (1 - (1 - gamma)^k): the plain mean of the norms
        return self.gamma / -math.expm1(k * math.log1p(-self.gamma)) if self.gamma < 1.0 else 1.0

    def coefficient_values(self, g: GramRows) -> List[float]:
        # M x M arithmetic on plain floats (see _State).
        m, state = self.num_tasks, self._state
        state.floats()
        norms = [math.sqrt(max(g[i][i], 0.0)) for i in range(m)]
        if self.ema:
            if state.ema_norms is None:
                u = norms
            else:
                rate = self.gamma_at(self.steps_done + 1)
                u = [(1 - rate) * prev + rate * n for prev, n in zip(state.ema_norms, norms)]
            state.ema_norms = u
            scale = [ui / n if n > 0 else 0.0 for ui, n in zip(u, norms)]
        else:
            scale = [1.0] * m
        gram_v = [[scale[i] * g[i][j] * scale[j] for j in range(m)] for i in range(m)]
        lam = state.lambdas
        mix = [lj + self.rho * pj for lj, pj in zip(lam, self.prior)]  # lam + rho * lam0
        d = [sum(gram_v[i][j] * mix[j] for j in range(m)) for i in range(m)]  # V_i . (V mix)
        if self.direction == "cosine":
            mix_norm = math.sqrt(max(sum(mj * dj for mj, dj in zip(mix, d)), 0.0))
            v_norms = [math.sqrt(max(gram_v[i][i], 0.0)) for i in range(m)]
            d = [di / (vn * mix_norm) if vn * mix_norm > 0 else 0.0 for di, vn in zip(d, v_norms)]
        lam = project_simplex_values([lj - self.beta * dj for lj, dj in zip(lam, d)])
        state.lambdas = lam
        return [self._out_scale * lj * sj for lj, sj in zip(lam, scale)]

    def coefficient_tensor(self, g: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
        """`coefficient_values` with tensors; the state changes only where ``finite``."""
        m, state = self.num_tasks, self._state
        state.tensors(g.device, m)
        lam, ema, started = state.lambdas, state.ema_norms, state.started
        norms = g.diagonal().clamp_min(0.0).sqrt()
        if self.ema:
            rate = self.gamma_at(self.steps_done + 1)
            u = torch.where(started, (1 - rate) * ema + rate * norms, norms)
            scale = torch.where(norms > 0, u / torch.where(norms > 0, norms, 1.0), 0.0)
            state.ema_norms = torch.where(finite, u, ema)
            state.started = started | finite
        else:
            scale = torch.ones_like(norms)
        gram_v = scale.unsqueeze(1) * g * scale.unsqueeze(0)
        mix = lam + self.rho * self._constant("prior", self.prior, g)
        d = gram_v @ mix
        if self.direction == "cosine":
            denom = gram_v.diagonal().clamp_min(0.0).sqrt() * (mix @ d).clamp_min(0.0).sqrt()
            d = torch.where(denom > 0, d / torch.where(denom > 0, denom, 1.0), 0.0)
        new = project_simplex_tensor(lam - self.beta * d)
        state.lambdas = torch.where(finite, new, lam)
        return self._out_scale * new * scale

"""`drgrad`: DRGrad's router (Eq. 1-2, Table 1), updater (Eq. 7) and loss weights α
(Algorithm 1) from Liu, Miao, Xia, "Direct Routing Gradient (DRGrad)", AAAI 2025, and
`DRGradPoint`, the autograd node where the router acts inside the one backward pass.

The split-MMoE model (models/drgrad.py) gives the primary task a dedicated input v1 (read by
its tower T1') and a shared input vs (read by its tower T1'' and by every secondary tower).
The node receives g1' at v1 and g1'', g_k at vs and returns the routed gradients for v1 and
vs; the model mixes the primary's two towers with the updater's μ (`DRGrad.aggregate`,
Eq. 8). What each equation means here and every reading of the paper:
docs/methods.md.

Options: primary = 0 (task index or label name), gamma = 1.0 (γ > 0 of Eq. 1), decay = 1.0
(1.0: Eq. 7's accumulated sum; < 1 a discounted sum, which stays bounded), loss_weights
(α per task, default 1 each). It needs the split-MMoE task side (``task_side``) and acts at
the representation only.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from ..base import Balancer, TaskInfo, gram_is_finite, plain_sum, weighted_sum
from ..gram import GramRows
from ..options import check_float, check_per_task
from ..point import PointBase
from ..registry import register
from ..small_linalg import quad


class Route(NamedTuple):
    """The router's numbers for one step: Eq. 1's ξ and λ, and Eq. 2 as coefficients,
    g'_R1 = dedicated_from_shared·g1'' + dedicated_from_secondary·g2 and
    g''_R1 = shared_extra·g1''; ``case`` is Table 1's row (1-4, top to bottom)."""

    xi1: float
    xi2: float
    lambda1: float
    lambda2: float
    dedicated_from_shared: float
    dedicated_from_secondary: float
    shared_extra: float
    case: int


def _cosine(dot: float, norm_a: float, norm_b: float) -> float:
    """Cosine from a dot product and two norms; 0 when a gradient is zero."""
    denom = norm_a * norm_b
    return min(max(dot / denom, -1.0), 1.0) if denom > 0 else 0.0


def _clipped_ratio(num: float, den: float) -> float:
    """clip(num / den, 0, 1) for norms; a zero denominator gives 1 (0 when both are zero)."""
    if den > 0:
        return min(num / den, 1.0)
    return 1.0 if num > 0 else 0.0


def route(gram: GramRows, gamma: float) -> Route:
    """Eq. 1-2 from the Gram [3, 3] of (g1', g1'', g2) as rows of floats:
    ξ1 = cos(g1', g2), ξ2 = cos(g1', g1''), λ1 = clip(‖g1'‖/‖g2‖, 0, 1)^γ,
    λ2 = clip(‖g1'‖/‖g1''‖, 0, 1)^γ, g'_R1 = (1 - 1{ξ1<0}·ξ1)·λ1·g1'' + 1{ξ2≥0}·λ2·g2,
    g''_R1 = -1{ξ1·ξ2<0}·ξ1·ξ2·g1''."""
    n1p, n1pp, n2 = (math.sqrt(max(gram[i][i], 0.0)) for i in range(3))
    xi1 = _cosine(gram[0][2], n1p, n2)
    xi2 = _cosine(gram[0][1], n1p, n1pp)
    lam1 = _clipped_ratio(n1p, n2) ** gamma
    lam2 = _clipped_ratio(n1p, n1pp) ** gamma
    return Route(
        xi1=xi1,
        xi2=xi2,
        lambda1=lam1,
        lambda2=lam2,
        dedicated_from_shared=(1.0 - (xi1 if xi1 < 0 else 0.0)) * lam1,
        dedicated_from_secondary=lam2 if xi2 >= 0 else 0.0,
        shared_extra=-xi1 * xi2 if xi1 * xi2 < 0 else 0.0,
        case=1 + 2 * (xi1 < 0) + (xi2 < 0),
    )


def _nonzero_sum(coef: Sequence[float], grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_m coef_m grads[m]`` over the non-zero coefficients (the first is never zero)."""
    kept = [(c, g) for c, g in zip(coef, grads) if c != 0.0]
    return weighted_sum([c for c, _ in kept], [g for _, g in kept])


@register("drgrad")
class DRGrad(Balancer):
    """DRGrad's router, updater and loss weights (module docstring); routes through
    `DRGradPoint`. At a plain `BalancePoint` there is no dedicated path (g1' = 0): the router
    then adds nothing and the result is the plain sum."""

    levels = ("representation",)
    task_side = "split_mmoe"

    def __init__(
        self,
        num_tasks: int,
        primary: Union[int, str] = 0,
        gamma: float = 1.0,
        decay: float = 1.0,
        loss_weights: Optional[Sequence[float]] = None,
        process_group: Optional[Any] = None,
    ) -> None:
        super().__init__(num_tasks, process_group)
        if num_tasks < 2:
            raise ValueError("balance.method='drgrad' needs at least 2 tasks (a primary and a secondary)")
        self.primary = primary
        self.primary_index: Optional[int] = None
        if isinstance(primary, int) and not isinstance(primary, bool):
            if not 0 <= primary < num_tasks:
                raise ValueError(
                    f"balance option 'primary' must be a task index in [0, {num_tasks - 1}] or a label name, got {primary!r}"
                )
            self.primary_index = primary
        elif not (isinstance(primary, str) and primary):
            raise ValueError(f"balance option 'primary' must be a task index or a label name, got {primary!r}")
        self.gamma = check_float("gamma", gamma, low=0.0, low_inclusive=False)
        self.decay = check_float("decay", decay, low=0.0, high=1.0)
        alpha = check_per_task("loss_weights", 1.0 if loss_weights is None else loss_weights, num_tasks, low=0.0)
        self.loss_weights: Optional[List[float]] = None if all(a == 1.0 for a in alpha) else alpha
        self.register_buffer("alpha", torch.tensor(alpha), persistent=False)
        #: σ and μ live as Python floats (read in every forward, written in every backward,
        #: without a device round trip); the buffers hold them when the state is saved.
        self.register_buffer("sigma", torch.zeros(2, dtype=torch.float64))
        self.register_buffer("mu", torch.full((2,), 0.5, dtype=torch.float64))
        self._sigma = [0.0, 0.0]
        self._mu = [0.5, 0.5]
        self._route: Optional[Route] = None
        self._routed_norms = [0.0, 0.0]

    def bind_tasks(self, info: TaskInfo) -> None:
        """Resolve ``primary`` given as a label name to its task index."""
        super().bind_tasks(info)
        if self.primary_index is None:
            if self.primary not in info.names:
                raise ValueError(
                    f"balance option 'primary': {self.primary!r} is not a label of the data set; "
                    f"allowed: {', '.join(info.names)} or an index"
                )
            self.primary_index = list(info.names).index(str(self.primary))

    @property
    def p(self) -> int:
        return 0 if self.primary_index is None else self.primary_index

    # ----------------------------------------------------------------- Algorithm 1, Eq. 8
    def loss(self, losses: torch.Tensor) -> torch.Tensor:
        """Algorithm 1, line 2: Loss(t) = Σ_i α_i·Loss_i(t)."""
        losses = self._check_losses(losses)
        if self.loss_weights is None:
            return losses.sum()
        return (losses * self.alpha.to(losses.dtype)).sum()

    def aggregate(self, dedicated: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        """Eq. 8: the primary task's output μ'·T1'(v1) + μ''·T1''(vs), with the updater's μ."""
        return self._mu[0] * dedicated + self._mu[1] * shared

    # ----------------------------------------------------------------- router and updater
    def route_gradients(
        self, g1p: torch.Tensor, g1pp: torch.Tensor, secondary: Sequence[torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Gradients for (v1, vs): g1' + g'_R1 and g1'' + g''_R1 + g2, from g1' [B, ...] at v1,
        g1'' [B, ...] and the secondary tasks' gradients at vs, g2 being their sum (Eq. 1-2 on
        the global-batch Gram); then the updater (Eq. 7). Non-finite gradients: plain sums,
        no state change."""
        with torch.no_grad():
            gram = self._reduced_gram([g1p, g1pp, *secondary])
            g2 = secondary[0] if len(secondary) == 1 else plain_sum(secondary)
            self._last.weights = None
            if not gram_is_finite(gram):
                return g1p, plain_sum([g1pp, g2])
            g3 = _with_secondary_summed(gram)
            r = route(g3, self.gamma)
            coef_v1 = [1.0, r.dedicated_from_shared, r.dedicated_from_secondary]
            out_v1 = _nonzero_sum(coef_v1, [g1p, g1pp, g2])
            out_vs = weighted_sum([1.0 + r.shared_extra, 1.0], [g1pp, g2])
            self._route = r
            self._last.gram = self._task_gram(gram)
            self.update([math.sqrt(max(quad(g3, coef_v1), 0.0)),
                         (1.0 + r.shared_extra) * math.sqrt(max(g3[1][1], 0.0))])
            return out_v1, out_vs

    def update(self, routed_norms: Sequence[float]) -> List[float]:
        """Eq. 7: σ' ← decay·σ' + ‖g1' + g'_R1‖, σ'' ← decay·σ'' + ‖g1'' + g''_R1‖,
        (μ', μ'') = softmax(σ', σ''). Returns μ."""
        self._routed_norms = [float(x) for x in routed_norms]
        self._sigma = [self.decay * s + n for s, n in zip(self._sigma, self._routed_norms)]
        top = max(self._sigma)
        exp = [math.exp(s - top) for s in self._sigma]
        self._mu = [e / sum(exp) for e in exp]
        self._advance()
        return list(self._mu)

    def _save_to_state_dict(self, destination: Dict[str, Any], prefix: str, keep_vars: bool) -> None:
        self.sigma.copy_(torch.tensor(self._sigma, dtype=torch.float64))
        self.mu.copy_(torch.tensor(self._mu, dtype=torch.float64))
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._sigma, self._mu = self.sigma.tolist(), self.mu.tolist()

    def _task_gram(self, gram: GramRows) -> GramRows:
        """Gram of the per-task gradients at (v1, vs) for `stats()`: the primary's is (g1', g1''),
        a secondary task's (0, g_k); from the Gram of (g1', g1'', g_k ...)."""
        p = self.p
        rows = [0] * self.num_tasks  # each task's row at vs in ``gram``
        rows[p] = 1
        for j, k in enumerate(k for k in range(self.num_tasks) if k != p):
            rows[k] = 2 + j
        out = [[gram[rows[i]][rows[j]] for j in range(self.num_tasks)] for i in range(self.num_tasks)]
        out[p][p] += gram[0][0]
        return out

    def _combine(self, grads: Tuple[torch.Tensor, ...]) -> torch.Tensor:
        p = self.p
        others = [grads[k] for k in range(self.num_tasks) if k != p]
        return self.route_gradients(torch.zeros_like(grads[p]), grads[p], others)[1]

    def extra_stats(self) -> Dict[str, Any]:
        """DRGrad's own numbers for the run summary (identical on every rank)."""
        out: Dict[str, Any] = {
            "primary": self.p,
            "mu": list(self._mu),
            "sigma": list(self._sigma),
            "routed_norms": list(self._routed_norms),
            "loss_weights": [float(x) for x in self.alpha],
        }
        if self._route is not None:
            out.update(self._route._asdict())
        return out


def _with_secondary_summed(gram: GramRows) -> GramRows:
    """The Gram [3, 3] of (g1', g1'', g2 = Σ_k g_k) from the Gram of (g1', g1'', g_1 ... g_S)."""
    n = len(gram)
    col = [[row[0], row[1], sum(row[2:])] for row in gram]
    summed = [sum(col[i][j] for i in range(2, n)) for j in range(3)]
    return [col[0], col[1], summed]


class _RouteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, point: "DRGradPoint", v1: torch.Tensor, vs: torch.Tensor):  # type: ignore[override]
        ctx.point = point
        return (v1.view_as(v1), *[vs.view_as(vs) for _ in range(point.num_tasks)])

    @staticmethod
    def backward(ctx, g_v1: Optional[torch.Tensor], *g_vs: Optional[torch.Tensor]):  # type: ignore[override]
        point: DRGradPoint = ctx.point
        bal = point.balancer
        ref = next(g for g in (g_v1, *g_vs) if g is not None)
        point.timing.start(ref.device)
        fill = lambda g: torch.zeros_like(ref) if g is None else g  # noqa: E731
        secondary = [fill(g_vs[k]) for k in range(bal.num_tasks) if k != bal.p]
        out_v1, out_vs = bal.route_gradients(fill(g_v1), fill(g_vs[bal.p]), secondary)
        point.timing.stop()
        return None, out_v1, out_vs


class DRGradPoint(PointBase):
    """DRGrad's balance point: ``point(v1, vs)`` returns ``(v1', (vs_0, ..., vs_{M-1}))`` — v1'
    for the primary's T1', vs_p for its T1'' (p = primary), vs_k for task k's tower; in
    backward the router replaces their gradients. Without grad it passes the inputs through."""

    balancer_type = DRGrad

    def forward(self, v1: torch.Tensor, vs: torch.Tensor) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
        if v1.shape != vs.shape:
            raise ValueError(f"DRGradPoint: v1 and vs must have the same shape, got {list(v1.shape)} and {list(vs.shape)}")
        if torch.is_grad_enabled() and (v1.requires_grad or vs.requires_grad):
            outs = _RouteFunction.apply(self, v1, vs)
            return outs[0], tuple(outs[1:])
        return v1, tuple(vs for _ in range(self.num_tasks))

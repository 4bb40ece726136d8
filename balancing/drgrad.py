"""`drgrad`: DRGrad's router and updater (Liu, Miao, Xia, "Direct Routing Gradient (DRGrad):
A Personalized Information Surgery for Multi-Task Learning (MTL) Recommendations", AAAI 2025,
arXiv:2510.09643), as a balancer plus the autograd node `DRGradPoint`.

The model (models/drgrad.py, split-MMoE) gives the primary task ("task 1") a dedicated input
``v1`` read by its tower T1', and a shared input ``vs`` read by its second tower T1'' and by
every other task's tower. Task 1's logit is ``μ'·T1'(v1) + μ''·T1''(vs)``.

The paper's text (Eq. 1-2, Table 1, Eq. 7) was NOT available while this was written; the
router below is transcribed from the project's issue ("from g1', g1'' and g2, cosines ξ1, ξ2
and clipped norm ratios λ1, λ2 with exponent γ, route the extra gradients g'_R1 to v1 and
g''_R1 to vs") and every choice beyond that is an assumption, listed in
docs/methods_pub_drgrad.md. In the backward pass the node receives

    g1'   gradient at v1 from T1'
    g1''  gradient at vs from T1''
    g_k   gradient at vs from secondary task k  (k ≠ primary)

All of them have the shape [B, D] (v1 and vs are mixtures of the same experts, so their
coordinates correspond). From the global-batch Gram of (g1', g1'', g_2, …) — one all-reduce
of (M+1)² numbers, so every rank routes identically — per secondary task k (assumptions):

    ξ1_k = cos(g1', g_k)     does task k's gradient agree with task 1's dedicated path?
    ξ2_k = cos(g1'', g_k)    do task 1 and task k agree on the shared input?
    λ1_k = min(clip, (‖g1'‖ / ‖g_k‖)^γ)    scales g_k to at most task 1's own size (γ = 1)
    λ2   = min(clip, (‖g1''‖ / ‖g1'‖)^γ)   scales g1' to at most the size of g1''

Table 1 (four cases, by the signs of ξ1, ξ2; one secondary task):

    case 1  ξ1 > 0, ξ2 > 0:  g'_R1 = λ1 g2,  g''_R1 = λ2 g1'   (no conflict: share both ways)
    case 2  ξ1 > 0, ξ2 ≤ 0:  g'_R1 = λ1 g2,  g''_R1 = 0        (g2 helps v1; conflict at vs)
    case 3  ξ1 ≤ 0, ξ2 > 0:  g'_R1 = 0,      g''_R1 = λ2 g1'   (g2 would hurt v1)
    case 4  ξ1 ≤ 0, ξ2 ≤ 0:  g'_R1 = 0,      g''_R1 = 0        (conflict: plain split-MMoE)

Gradients returned upstream: ``v1 ← g1' + g'_R1``, ``vs ← g1'' + g''_R1 + Σ_k g_k``. With
several secondary tasks the routed parts are the MEAN over secondary tasks of the per-task
routed parts (so each routed part stays bounded by the primary's own gradient size, and two
tasks are the formula above).

Updater (Eq. 7): ``σ' ← d·σ' + ‖g1' + g'_R1‖``, ``σ'' ← d·σ'' + ‖g1'' + g''_R1‖`` (global-batch
norms), ``(μ', μ'') = softmax(σ', σ'')``. ``decay = d = 1`` is the paper's accumulated sum,
which grows without bound and saturates the softmax; ``d < 1`` is a bounded discounted sum
(an exponential moving average times 1/(1-d)). μ starts at (½, ½); the μ computed in a
step's backward is used from the next forward on.

Options: primary=0 (index, or a label name resolved by the model builder), gamma=1.0,
clip=1.0, decay=0.99 (bounded; chosen by a census measurement, see the docs; 1.0 is the
paper's accumulated form), personal_gate=True (PPNet gate on vs when the schema names personal features).
"""
from __future__ import annotations

import math
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .base import Balancer, gram_is_finite, plain_sum, weighted_sum
from .gram import GramRows, cosines_from_gram, norms_from_gram
from .options import check_bool, check_float
from .registry import register
from .small_linalg import quad


def _nonzero_sum(coef: Sequence[float], grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_m coef_m grads[m]`` over the non-zero coefficients only (finite gradients; the
    first coefficient is never zero here)."""
    kept = [(c, g) for c, g in zip(coef, grads) if c != 0.0]
    return weighted_sum([c for c, _ in kept], [g for _, g in kept])


def route_coefficients(gram: GramRows, gamma: float = 1.0, clip: float = 1.0) -> Dict[str, Any]:
    """Router coefficients from the Gram [2+S, 2+S] of (g1', g1'', g_1..g_S) (rows of floats).

    Returns ``dedicated`` [S] (g'_R1 = Σ_k dedicated_k g_k), ``shared`` (g''_R1 = shared·g1'),
    and the per-secondary ``xi1``, ``xi2``, ``lambda1``, ``lambda2``, ``case`` (1..4, Table 1)."""
    s = len(gram) - 2
    norms = [math.sqrt(max(gram[i][i], 0.0)) for i in range(s + 2)]

    def cosine(i: int, j: int) -> float:
        denom = norms[i] * norms[j]
        return min(max(gram[i][j] / denom, -1.0), 1.0) if denom > 0 else 0.0

    def ratio(num: float, den: float) -> float:
        return min((num / den if den > 0 else 0.0) ** gamma, clip)

    xi1 = [cosine(0, 2 + k) for k in range(s)]
    xi2 = [cosine(1, 2 + k) for k in range(s)]
    lam1 = [ratio(norms[0], norms[2 + k]) for k in range(s)]
    lam2 = [ratio(norms[1], norms[0])] * s
    case = [(1 if b > 0 else 2) if a > 0 else (3 if b > 0 else 4) for a, b in zip(xi1, xi2)]
    per = max(s, 1)
    dedicated = [lam / per if a > 0 else 0.0 for lam, a in zip(lam1, xi1)]
    shared = sum(lam for lam, b in zip(lam2, xi2) if b > 0) / per
    return {"dedicated": dedicated, "shared": shared, "xi1": xi1, "xi2": xi2,
            "lambda1": lam1, "lambda2": lam2, "case": case}


@register("drgrad")
class DRGrad(Balancer):
    """DRGrad router + updater state (see module docstring). Used through `DRGradPoint`."""

    def __init__(
        self,
        num_tasks: int,
        primary: Union[int, str] = 0,
        gamma: float = 1.0,
        clip: float = 1.0,
        decay: float = 0.99,
        personal_gate: bool = True,
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
        self.gamma = check_float("gamma", gamma, low=0.0)
        self.clip = check_float("clip", clip, low=0.0, low_inclusive=False)
        self.decay = check_float("decay", decay, low=0.0, high=1.0)
        self.personal_gate = check_bool("personal_gate", personal_gate)
        self.register_buffer("sigma", torch.zeros(2, dtype=torch.float64))
        self.register_buffer("mu", torch.full((2,), 0.5, dtype=torch.float64))
        self._route: Dict[str, Any] = {}
        self._routed_norms = [0.0, 0.0]
        self._vs_gram: Optional[Tuple[GramRows, float]] = None

    def resolve_primary(self, labels: List[str]) -> int:
        """Index of the primary task among ``labels`` (the data set's label names)."""
        if self.primary_index is None:
            if self.primary not in labels:
                raise ValueError(
                    f"balance option 'primary': {self.primary!r} is not a label of the data set; "
                    f"allowed: {', '.join(labels)} or an index"
                )
            self.primary_index = labels.index(str(self.primary))
        return self.primary_index

    @property
    def p(self) -> int:
        return 0 if self.primary_index is None else self.primary_index

    # ----------------------------------------------------------------- the method
    def route(
        self, g1p: torch.Tensor, g1pp: torch.Tensor, secondary: Sequence[torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Gradients for (v1, vs) from g1' [B, D], g1'' [B, D] and the secondary tasks'
        gradients at vs (S tensors [B, D], or one [S, B, D]); updates σ, μ. Non-finite
        inputs: plain sums, no state change."""
        with torch.no_grad():
            others = list(secondary)
            gram = self._reduced_gram([g1p, g1pp, *others])
            if not gram_is_finite(gram):
                return g1p, plain_sum([g1pp, *others])
            r = route_coefficients(gram, self.gamma, self.clip)
            self._route = r
            ded, shared = r["dedicated"], r["shared"]
            out_v1 = _nonzero_sum([1.0, *ded], [g1p, *others])
            out_vs = _nonzero_sum([shared, 1.0] + [1.0] * len(others), [g1p, g1pp, *others])
            # ‖g1' + g'_R1‖ and ‖g1'' + g''_R1‖ from the Gram: quadratic forms q G q
            q1 = [1.0, 0.0, *ded]
            q2 = [shared, 1.0] + [0.0] * len(others)
            self.update([math.sqrt(max(quad(gram, q1), 0.0)), math.sqrt(max(quad(gram, q2), 0.0))])
            self._telemetry(gram)
            return out_v1, out_vs

    def update(self, routed_norms: Sequence[float]) -> List[float]:
        """Eq. 7: σ ← decay·σ + (‖g1'+g'_R1‖, ‖g1''+g''_R1‖); μ = softmax(σ). Returns μ."""
        self._routed_norms = [float(x) for x in routed_norms]
        sigma = [self.decay * s + n for s, n in zip(self.sigma.tolist(), self._routed_norms)]
        top = max(sigma)
        exp = [math.exp(s - top) for s in sigma]
        total = sum(exp)
        mu = [e / total for e in exp]
        self.sigma.copy_(torch.tensor(sigma, dtype=torch.float64))
        self.mu.copy_(torch.tensor(mu, dtype=torch.float64))
        self._advance()
        return mu

    def _telemetry(self, gram: GramRows) -> None:
        """Keep the Gram at vs for `stats()`: rows of each task's gradient at vs (g1'' for the
        primary), and the primary's norm ‖(g1', g1'')‖."""
        m, p = self.num_tasks, self.p
        task_rows = [0] * m  # row of the Gram holding each task's gradient at vs
        task_rows[p] = 1
        for j, k in enumerate(k for k in range(m) if k != p):
            task_rows[k] = 2 + j
        sub = [[gram[i][j] for j in task_rows] for i in task_rows]
        self._vs_gram = (sub, math.sqrt(max(gram[0][0] + gram[1][1], 0.0)))

    def _combine(self, grads: Tuple[torch.Tensor, ...]) -> torch.Tensor:
        """At a plain BalancePoint there is no dedicated path (g1' = 0): nothing to route, the
        result is the plain sum (the updater still runs). The model uses `DRGradPoint`."""
        p = self.p
        others = [grads[k] for k in range(self.num_tasks) if k != p]
        _, out_vs = self.route(torch.zeros_like(grads[p]), grads[p], others)
        return out_vs

    def stats(self) -> Dict[str, Optional[torch.Tensor]]:
        if self._vs_gram is not None:
            sub, primary_norm = self._vs_gram
            gram = torch.tensor(sub, dtype=torch.float64)
            self._cosines = cosines_from_gram(gram)
            self._grad_norms = norms_from_gram(gram)
            self._grad_norms[self.p] = primary_norm
            self._vs_gram = None
        out = super().stats()
        out["weights"] = None  # DRGrad does not weight tasks; μ is in extra_stats()
        return out

    def extra_stats(self) -> Dict[str, Any]:
        """DRGrad's own numbers for the run summary (identical on every rank)."""
        r = self._route
        return {
            "primary": self.p,
            "mu": [float(x) for x in self.mu],
            "sigma": [float(x) for x in self.sigma],
            "routed_norms": [float(x) for x in self._routed_norms],
            **{k: [float(x) for x in r[k]] for k in ("xi1", "xi2", "lambda1", "lambda2", "case") if k in r},
        }


class _RouteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, point: "DRGradPoint", v1: torch.Tensor, vs: torch.Tensor):  # type: ignore[override]
        ctx.point = point
        m = point.balancer.num_tasks
        return (v1.view_as(v1), *[vs.view_as(vs) for _ in range(m)])

    @staticmethod
    def backward(ctx, g_v1: Optional[torch.Tensor], *g_vs: Optional[torch.Tensor]):  # type: ignore[override]
        start = time.perf_counter()
        point: DRGradPoint = ctx.point
        bal = point.balancer
        ref = next(g for g in (g_v1, *g_vs) if g is not None)
        fill = lambda g: torch.zeros_like(ref) if g is None else g  # noqa: E731
        p = bal.p
        secondary = [fill(g_vs[k]) for k in range(bal.num_tasks) if k != p]
        out_v1, out_vs = bal.route(fill(g_v1), fill(g_vs[p]), secondary)
        point.last_balance_seconds = time.perf_counter() - start
        return None, out_v1, out_vs


class DRGradPoint(nn.Module):
    """The DRGrad balance point: ``point(v1, vs)`` returns ``(v1', (vs_0, …, vs_{M-1}))`` —
    v1' for the primary's dedicated tower T1', vs_p for its shared tower T1'' (p = primary),
    vs_k for task k's tower. In backward it routes (see module docstring). Without grad it
    passes the inputs through."""

    def __init__(self, balancer: DRGrad) -> None:
        super().__init__()
        if not isinstance(balancer, DRGrad):
            raise ValueError(f"DRGradPoint needs the 'drgrad' balancer, got {type(balancer).__name__}")
        self.balancer = balancer
        self.last_balance_seconds: float = 0.0

    @property
    def num_tasks(self) -> int:
        return self.balancer.num_tasks

    def forward(self, v1: torch.Tensor, vs: torch.Tensor) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
        if v1.shape != vs.shape:
            raise ValueError(f"DRGradPoint: v1 and vs must have the same shape, got {list(v1.shape)} and {list(vs.shape)}")
        if torch.is_grad_enabled() and (v1.requires_grad or vs.requires_grad):
            outs = _RouteFunction.apply(self, v1, vs)
            return outs[0], tuple(outs[1:])
        return v1, tuple(vs for _ in range(self.num_tasks))

"""Nash-bargaining weights: alpha > 0 with ``K alpha = 1 / alpha`` (Navon et al. 2022).

The condition is the stationarity condition of the strictly convex function
``f(a) = ½ aᵀ K a - sum_i log a_i`` on the positive orthant, so a damped Newton method
(Hessian ``K + diag(1/a²)``, fraction-to-boundary step to keep ``a > 0``, Armijo
backtracking) solves it in a few iterations. Used by `nashmtl` and by PUB.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from .small_linalg import Matrix, Vector, dot, matvec, quad, solve


def _objective(k: Matrix, a: Vector) -> float:
    return 0.5 * quad(k, a) - sum(math.log(x) for x in a)


def _residual(a: Vector, ka: Vector) -> float:
    """max_i |a_i (K a)_i - 1| from a and K a: zero at the solution."""
    return max(abs(ai * kai - 1.0) for ai, kai in zip(a, ka))


def nash_bargaining_values(
    k: Matrix,
    init: Optional[Sequence[float]] = None,
    max_iter: int = 100,
    tol: float = 1e-9,
    ridge: float = 0.0,
) -> Tuple[Vector, bool]:
    """Solve ``K a = 1/a``, ``a > 0`` for a PSD K given as M rows of floats.

    ``init`` warm-starts the iteration (e.g. the previous step's solution; ignored unless
    every entry is finite and positive). ``ridge`` adds ``ridge * mean(diag K) * I`` so a
    singular K (e.g. opposite gradients, where no solution exists) still has one.
    Converged means ``max_i |a_i (K a)_i - 1| <= tol``. Returns ``(a, converged)``.
    """
    m = len(k)
    if ridge > 0:
        shift = ridge * max(sum(k[i][i] for i in range(m)) / m, 0.0)
        k = [[k[i][j] + (shift if i == j else 0.0) for j in range(m)] for i in range(m)]
    if init is not None and len(init) == m and all(math.isfinite(x) and x > 0 for x in init):
        a = [float(x) for x in init]
    else:
        a = [1.0 / math.sqrt(max(k[i][i], 2.2250738585072014e-308)) for i in range(m)]
    curvature = quad(k, a)
    if curvature > 0:  # best multiple of the start point: c² aᵀKa = M
        a = [x * math.sqrt(m / curvature) for x in a]
    for _ in range(max_iter):
        ka = matvec(k, a)
        if _residual(a, ka) <= tol:
            return a, True
        grad = [kai - 1.0 / ai for ai, kai in zip(a, ka)]
        hess = [[k[i][j] + (1.0 / (a[i] * a[i]) if i == j else 0.0) for j in range(m)] for i in range(m)]
        step = solve(hess, grad)
        if step is None:
            break
        limits = [ai / si for ai, si in zip(a, step) if si > 0]
        t = min(1.0, 0.99 * min(limits)) if limits else 1.0
        f0 = _objective(k, a)
        slope = dot(grad, step)
        slack = 1e-13 * max(1.0, abs(f0))  # tolerate round-off once f is flat
        while t > 1e-16 and _objective(k, [ai - t * si for ai, si in zip(a, step)]) > f0 - 1e-4 * t * slope + slack:
            t *= 0.5
        if t <= 1e-16:
            break
        a = [ai - t * si for ai, si in zip(a, step)]
    return a, _residual(a, matvec(k, a)) <= tol


def nash_bargaining_weights(
    gram: torch.Tensor,
    init: Optional[torch.Tensor] = None,
    max_iter: int = 100,
    tol: float = 1e-9,
    ridge: float = 0.0,
) -> Tuple[torch.Tensor, bool]:
    """`nash_bargaining_values` for a Gram tensor [M, M]: ``(a, converged)`` with ``a``
    float64 on the device of ``gram``."""
    rows = gram.detach().to("cpu", torch.float64).tolist()
    start = None if init is None else init.detach().to("cpu", torch.float64).reshape(-1).tolist()
    a, ok = nash_bargaining_values(rows, start, max_iter=max_iter, tol=tol, ridge=ridge)
    return torch.tensor(a, dtype=torch.float64, device=gram.device), ok


def nash_task_weights(
    k: Matrix, previous: Sequence[float], normalize: bool, max_iter: int, tol: float, ridge: float
) -> Optional[Vector]:
    """Nash-MTL's and PUB's α from a Gram K (rows of floats): K divided by its Frobenius norm
    when ``normalize``; tasks with a zero diagonal get 0 and stay out of the solve, which is
    warm-started from ``previous`` when that is positive on the others. None when the solve
    does not converge to a finite positive α (the callers then keep ``previous``)."""
    m = len(k)
    if normalize:
        scale = math.sqrt(sum(x * x for row in k for x in row))
        if scale > 0:
            k = [[x / scale for x in row] for row in k]
    active = [i for i in range(m) if k[i][i] > 0]
    alpha = [0.0] * m
    if not active:
        return alpha
    sub = [[k[i][j] for j in active] for i in active]
    init = [previous[i] for i in active]
    solved, ok = nash_bargaining_values(sub, init if all(x > 0 for x in init) else None,
                                        max_iter=max_iter, tol=tol, ridge=ridge)
    if not (ok and all(math.isfinite(x) and x > 0 for x in solved)):
        return None
    for i, x in zip(active, solved):
        alpha[i] = x
    return alpha

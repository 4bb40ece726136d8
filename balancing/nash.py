"""Nash-bargaining weights: alpha > 0 with ``K alpha = 1 / alpha`` (Navon et al. 2022).

The condition is the stationarity condition of the strictly convex function
``f(a) = ½ aᵀ K a - sum_i log a_i`` on the positive orthant, so a damped Newton method
(Hessian ``K + diag(1/a²)``, fraction-to-boundary step to keep ``a > 0``, Armijo
backtracking) solves it in a few iterations. Used by `nashmtl` and by PUB.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def _objective(k: torch.Tensor, a: torch.Tensor) -> float:
    return float(0.5 * (a @ k @ a) - torch.log(a).sum())


def nash_bargaining_weights(
    gram: torch.Tensor,
    init: Optional[torch.Tensor] = None,
    max_iter: int = 100,
    tol: float = 1e-9,
    ridge: float = 0.0,
) -> Tuple[torch.Tensor, bool]:
    """Solve ``K a = 1/a``, ``a > 0`` for a PSD ``gram`` K [M, M].

    ``init`` warm-starts the iteration (e.g. the previous step's solution; non-positive or
    non-finite entries are ignored). ``ridge`` adds ``ridge * mean(diag K) * I`` so a
    singular K (e.g. opposite gradients, where no solution exists) still has one.
    Converged means ``max_i |a_i (K a)_i - 1| <= tol``. Returns ``(a, converged)`` with ``a``
    float64 on the device of ``gram``.
    """
    device = gram.device
    k = gram.detach().to("cpu", torch.float64)
    m = k.shape[0]
    if ridge > 0:
        k = k + ridge * k.diagonal().mean().clamp_min(0) * torch.eye(m, dtype=k.dtype)
    if init is not None:
        a = init.detach().to("cpu", torch.float64).clone()
    if init is None or a.shape != (m,) or not (torch.isfinite(a).all() and (a > 0).all()):
        d = k.diagonal().clamp_min(torch.finfo(torch.float64).tiny)
        a = d.rsqrt()
    quad = float(a @ k @ a)
    if quad > 0:  # best multiple of the start point: c² aᵀKa = M
        a = a * (m / quad) ** 0.5
    for _ in range(max_iter):
        ka = k @ a
        if float((a * ka - 1).abs().max()) <= tol:
            return a.to(device), True
        grad = ka - 1.0 / a
        hess = k + torch.diag(1.0 / (a * a))
        step = torch.linalg.solve(hess, grad)
        pos = step > 0
        t = 1.0
        if pos.any():
            t = min(1.0, 0.99 * float((a[pos] / step[pos]).min()))
        f0 = _objective(k, a)
        slope = float(grad @ step)
        slack = 1e-13 * max(1.0, abs(f0))  # tolerate round-off once f is flat
        while t > 1e-16 and _objective(k, a - t * step) > f0 - 1e-4 * t * slope + slack:
            t *= 0.5
        if t <= 1e-16:
            break
        a = a - t * step
    converged = bool(float((a * (k @ a) - 1).abs().max()) <= tol)
    return a.to(device), converged

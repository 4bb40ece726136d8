"""Minimum-norm point of the convex hull of M vectors, from their Gram matrix only.

Solves ``min_{a in simplex} aᵀ K a`` (MGDA; Sener & Koltun 2018). M=2 has a closed form; for
M>2 an accelerated projected-gradient method (FISTA with adaptive restart) finds the active
set and an exact KKT solve on that active set polishes the result to machine precision.
"""
from __future__ import annotations

import torch

from .simplex import project_simplex


def _two_task(k: torch.Tensor) -> torch.Tensor:
    """Closed form for M=2: a1 = clip((K22 - K12) / (K11 + K22 - 2 K12), 0, 1)."""
    denom = k[0, 0] + k[1, 1] - 2 * k[0, 1]
    if denom <= 0:  # identical vectors: every convex combination is the same point
        a1 = torch.tensor(0.5, dtype=k.dtype)
    else:
        a1 = ((k[1, 1] - k[0, 1]) / denom).clamp(0.0, 1.0)
    return torch.stack([a1, 1 - a1])


def _polish(k: torch.Tensor, a: torch.Tensor, support_tol: float) -> torch.Tensor:
    """Exact minimiser by an active-set refinement of the iterative solution ``a``.

    On a support S the optimum solves [[K_SS, 1], [1ᵀ, 0]] [a_S; -mu] = [0; 1]; indices with
    a negative solution leave S. The result is accepted only if it satisfies the KKT
    conditions ((K a)_j >= aᵀKa off the support), otherwise ``a`` is returned unchanged.
    """
    m = k.shape[0]
    support = [i for i in range(m) if float(a[i]) > support_tol]
    scale = float(k.diagonal().max())
    while support:
        n = len(support)
        s = torch.tensor(support)
        kkt = torch.zeros(n + 1, n + 1, dtype=k.dtype)
        kkt[:n, :n] = k[s][:, s]
        kkt[:n, n] = 1.0
        kkt[n, :n] = 1.0
        rhs = torch.zeros(n + 1, dtype=k.dtype)
        rhs[n] = 1.0
        try:  # (linalg.solve is deterministic; lstsq is not, and ranks must agree bitwise)
            sol = torch.linalg.solve(kkt, rhs)[:n]
        except RuntimeError:  # singular system: keep the iterative solution
            return a
        if not torch.isfinite(sol).all():
            return a
        if (sol < 0).any():
            support.pop(int(torch.argmin(sol)))
            continue
        cand = torch.zeros_like(a)
        cand[s] = sol
        cand = cand / cand.sum()
        kc = k @ cand
        if bool((kc >= cand @ kc - 1e-12 * scale).all()):
            return cand
        return a
    return a


def min_norm_weights(gram: torch.Tensor, max_iter: int = 500, tol: float = 1e-12) -> torch.Tensor:
    """Weights ``a`` on the simplex minimising ``||sum_m a_m g_m||² = aᵀ K a`` for ``K = gram``.

    Returns float64 weights [M] on the device of ``gram`` (the solve runs on CPU in float64).
    """
    device = gram.device
    k = gram.detach().to("cpu", torch.float64)
    m = k.shape[0]
    if m == 1:
        return torch.ones(1, dtype=torch.float64, device=device)
    if m == 2:
        return _two_task(k).to(device)
    lip = float(torch.linalg.eigvalsh(k)[-1])
    a = torch.full((m,), 1.0 / m, dtype=torch.float64)
    if lip <= 0:
        return a.to(device)
    y, t = a.clone(), 1.0
    f_a = float(a @ k @ a)
    for _ in range(max_iter):
        a_new = project_simplex(y - (k @ y) / lip)
        f_new = float(a_new @ k @ a_new)
        if f_new > f_a:  # adaptive restart keeps the iteration monotone
            y, t = a.clone(), 1.0
            continue
        done = float((a_new - a).abs().max()) < tol
        t_new = (1.0 + (1.0 + 4.0 * t * t) ** 0.5) / 2.0
        y = a_new + ((t - 1.0) / t_new) * (a_new - a)
        a, f_a, t = a_new, f_new, t_new
        if done:
            break
    return _polish(k, a, support_tol=1e-9).to(device)

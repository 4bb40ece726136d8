"""Minimum-norm point of the convex hull of M vectors, from their Gram matrix only.

Solves ``min_{a in simplex} aᵀ K a`` (MGDA; Sener & Koltun 2018). M=2 has a closed form; for
M>2 an accelerated projected-gradient method (FISTA with adaptive restart) finds the active
set and an exact KKT solve on that active set polishes the result to machine precision.
"""
from __future__ import annotations

from typing import List

import torch

from .simplex import project_simplex_values
from .small_linalg import Matrix, Vector, largest_eigenvalue, matvec, quad, solve


def _two_task(k: Matrix) -> Vector:
    """Closed form for M=2: a1 = clip((K22 - K12) / (K11 + K22 - 2 K12), 0, 1)."""
    denom = k[0][0] + k[1][1] - 2 * k[0][1]
    if denom <= 0:  # identical vectors: every convex combination is the same point
        a1 = 0.5
    else:
        a1 = min(max((k[1][1] - k[0][1]) / denom, 0.0), 1.0)
    return [a1, 1 - a1]


def _polish(k: Matrix, a: Vector, support_tol: float) -> Vector:
    """Exact minimiser by an active-set refinement of the iterative solution ``a``.

    On a support S the optimum solves [[K_SS, 1], [1ᵀ, 0]] [a_S; -mu] = [0; 1]; indices with
    a negative solution leave S. The result is accepted only if it satisfies the KKT
    conditions ((K a)_j >= aᵀKa off the support), otherwise ``a`` is returned unchanged.
    """
    m = len(k)
    support = [i for i in range(m) if a[i] > support_tol]
    scale = max(k[i][i] for i in range(m))
    while support:
        n = len(support)
        kkt = [[k[i][j] for j in support] + [1.0] for i in support] + [[1.0] * n + [0.0]]
        sol = solve(kkt, [0.0] * n + [1.0])
        if sol is None:  # singular system: keep the iterative solution
            return a
        sol = sol[:n]
        if any(x < 0 for x in sol):
            support.pop(min(range(n), key=lambda i: sol[i]))
            continue
        total = sum(sol)
        cand = [0.0] * m
        for i, x in zip(support, sol):
            cand[i] = x / total
        kc = matvec(k, cand)
        value = sum(c * x for c, x in zip(cand, kc))
        return cand if all(x >= value - 1e-12 * scale for x in kc) else a
    return a


def min_norm_values(k: Matrix, max_iter: int = 500, tol: float = 1e-12) -> Vector:
    """Weights ``a`` on the simplex minimising ``aᵀ K a`` for a Gram K given as rows of floats.

    FISTA with adaptive restart and step 1/lambda_max(K), then `_polish`."""
    m = len(k)
    if m == 1:
        return [1.0]
    if m == 2:
        return _two_task(k)
    lip = largest_eigenvalue(k)
    a = [1.0 / m] * m
    if lip <= 0:
        return a
    y, t = list(a), 1.0
    f_a = quad(k, a)
    for _ in range(max_iter):
        a_new = project_simplex_values([yi - ki / lip for yi, ki in zip(y, matvec(k, y))])
        f_new = quad(k, a_new)
        if f_new > f_a:  # adaptive restart keeps the iteration monotone
            y, t = list(a), 1.0
            continue
        done = max(abs(x - z) for x, z in zip(a_new, a)) < tol
        t_new = (1.0 + (1.0 + 4.0 * t * t) ** 0.5) / 2.0
        y = [x + ((t - 1.0) / t_new) * (x - z) for x, z in zip(a_new, a)]
        a, f_a, t = a_new, f_new, t_new
        if done:
            break
    return _polish(k, a, support_tol=1e-9)


def min_norm_weights(gram: torch.Tensor, max_iter: int = 500, tol: float = 1e-12) -> torch.Tensor:
    """`min_norm_values` for a Gram tensor [M, M]: float64 weights [M] on its device."""
    rows: List[List[float]] = gram.detach().to("cpu", torch.float64).tolist()
    return torch.tensor(min_norm_values(rows, max_iter, tol), dtype=torch.float64, device=gram.device)

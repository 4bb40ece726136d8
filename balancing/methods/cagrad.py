"""`cagrad`: Conflict-Averse Gradient descent (Liu et al., NeurIPS 2021).

With g0 the average gradient and phi = c² ||g0||², CAGrad's dual is
  w* = argmin_{w in simplex} g_wᵀ g0 + sqrt(phi) ||g_w||,   g_w = sum_m w_m g_m,
and the update direction is d = g0 + (sqrt(phi) / ||g_w*||) g_w*, divided by 1 + c²
(rescale=1, the authors' default), 1 + c (rescale=2) or 1 (rescale=0). All terms are Gram
quadratic forms; the dual is solved by projected gradient descent with backtracking on
the M simplex variables (`solve_dual`). d is on the scale of the AVERAGE gradient (paper
convention). ``stats()["weights"]`` are the effective multipliers (1/M + lambda w*)/rescale.
On the device the dual is solved exactly by enumerating the simplex's faces (up to 10 tasks;
above that the host solver runs, which reads the Gram). Options: c=0.5, rescale=1.
"""
from __future__ import annotations

import math
from typing import Any, List, Optional

import torch

from ..base import GramBalancer
from ..device_linalg import MAX_FACE_TASKS, cagrad_dual_tensor
from ..gram import GramRows
from ..options import check_float, check_int
from ..registry import register
from ..simplex import project_simplex_values
from ..small_linalg import Matrix, Vector, dot, largest_eigenvalue, matvec, quad, solve


def solve_dual(k: Matrix, c: float, max_iter: int = 50, tol: float = 1e-9) -> Vector:
    """argmin over the simplex of F(w) = wᵀK1/M + c ||g0|| sqrt(wᵀKw), K as rows of floats.

    Accelerated projected gradient (FISTA) with backtracking and adaptive restart finds the
    active face; `_polish` then solves the problem on that face exactly (Newton).
    """
    m = len(k)
    ones = [1.0 / m] * m
    lin = matvec(k, ones)
    radius = c * math.sqrt(max(dot(ones, lin), 0.0))  # c ||g0||
    floor = 1e-30 * max(sum(k[i][i] for i in range(m)), 1e-300)

    def value(w: Vector) -> float:
        return dot(lin, w) + radius * math.sqrt(max(quad(k, w), floor))

    def grad(w: Vector) -> Vector:
        kw = matvec(k, w)
        norm = math.sqrt(max(dot(w, kw), floor))
        return [li + radius * x / norm for li, x in zip(lin, kw)]

    top = largest_eigenvalue(k)
    if not top > 0:  # all gradients zero: every w is optimal
        return ones
    step = 1.0 / top
    w = list(ones)
    f_w = value(w)
    y, t = list(w), 1.0
    for _ in range(max_iter):
        f_y, g_y = value(y), grad(y)
        while True:
            cand = project_simplex_values([yi - step * gi for yi, gi in zip(y, g_y)])
            diff = [ci - yi for ci, yi in zip(cand, y)]
            f_c = value(cand)
            if f_c <= f_y + dot(g_y, diff) + dot(diff, diff) / (2 * step) or step < 1e-300:
                break
            step *= 0.5
        if f_c > f_w:  # restart: momentum made things worse
            y, t = list(w), 1.0
            continue
        moved = max(abs(ci - wi) for ci, wi in zip(cand, w))
        t_new = (1.0 + (1.0 + 4.0 * t * t) ** 0.5) / 2.0
        y = [ci + ((t - 1.0) / t_new) * (ci - wi) for ci, wi in zip(cand, w)]
        w, f_w, t = cand, f_c, t_new
        if moved < tol:
            break
    return _polish(k, lin, radius, w, floor)


def _polish(k: Matrix, lin: Vector, radius: float, w: Vector, floor: float) -> Vector:
    """Active-set Newton refinement of ``w``; returns ``w`` unchanged if it cannot certify
    the KKT conditions (grad_j >= nu off the support, equal on it)."""
    m = len(k)
    support = [i for i in range(m) if w[i] > 1e-9]
    total = sum(w[i] for i in support)
    x = [w[i] / total if i in support else 0.0 for i in range(m)]
    scale = max(max(abs(v) for v in lin), math.sqrt(max(max(k[i][i] for i in range(m)), 0.0)) * radius, 1e-300)
    for _ in range(4 * m):
        for _ in range(50):  # Newton on the face {x_S >= 0, sum x_S = 1}
            kx = matvec(k, x)
            n = math.sqrt(max(dot(x, kx), floor))
            g = [li + radius * v / n for li, v in zip(lin, kx)]
            # KKT system of the face: [[H_SS, 1], [1ᵀ, 0]], H = radius (K / n - (Kx)(Kx)ᵀ / n³)
            kkt = [[radius * (k[i][j] / n - kx[i] * kx[j] / n**3) for j in support] + [1.0] for i in support]
            kkt.append([1.0] * len(support) + [0.0])
            sol = solve(kkt, [-g[i] for i in support] + [0.0])
            if sol is None:
                return w
            delta = sol[: len(support)]
            blocking = [x[i] / -d for i, d in zip(support, delta) if d < 0]
            t = min(1.0, min(blocking)) if blocking else 1.0
            for i, d in zip(support, delta):
                x[i] = max(x[i] + t * d, 0.0)
            if t < 1.0:  # hit the boundary: the blocking index leaves the support
                support = [i for i in support if x[i] > 0]
                total = sum(x)
                x = [v / total for v in x]
                continue
            if max(abs(d) for d in delta) < 1e-15:
                break
        kx = matvec(k, x)
        norm = math.sqrt(max(dot(x, kx), floor))
        g = [li + radius * v / norm for li, v in zip(lin, kx)]
        nu = sum(g[i] for i in support) / len(support)
        viol = [j for j in range(m) if j not in support and g[j] < nu - 1e-12 * scale]
        if not viol:
            return x
        support.append(min(viol, key=lambda j: g[j]))
        support.sort()
    return w


@register("cagrad")
class CAGrad(GramBalancer):
    """CAGrad (see module docstring)."""

    def __init__(self, num_tasks: int, c: float = 0.5, rescale: int = 1, process_group: Optional[Any] = None) -> None:
        super().__init__(num_tasks, process_group)
        self.c = check_float("c", c, low=0.0)
        self.rescale = check_int("rescale", rescale, low=0)
        if self.rescale > 2:
            raise ValueError(f"balance option 'rescale' must be 0, 1 or 2, got {rescale!r}")
        self.device_path = num_tasks <= MAX_FACE_TASKS

    def coefficient_values(self, gram: GramRows) -> List[float]:
        m = self.num_tasks
        w = solve_dual(gram, self.c)
        g0_norm = math.sqrt(max(sum(map(sum, gram)) / (m * m), 0.0))  # ||g0||² = 1ᵀK1 / M²
        gw_norm = math.sqrt(max(quad(gram, w), 0.0))
        lam = self.c * g0_norm / gw_norm if gw_norm > 0 else 0.0
        return [(1.0 / m + lam * wi) / self._divisor() for wi in w]

    def coefficient_tensor(self, gram: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
        m = self.num_tasks
        w = cagrad_dual_tensor(gram, self.c)
        g0_norm = (gram.sum() / (m * m)).clamp_min(0.0).sqrt()
        gw_norm = (w @ gram @ w).clamp_min(0.0).sqrt()
        lam = torch.where(gw_norm > 0, self.c * g0_norm / torch.where(gw_norm > 0, gw_norm, 1.0), 0.0)
        return (1.0 / m + lam * w) / self._divisor()

    def _divisor(self) -> float:
        return {0: 1.0, 1: 1.0 + self.c**2, 2: 1.0 + self.c}[self.rescale]

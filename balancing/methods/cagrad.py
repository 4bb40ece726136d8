"""`cagrad`: Conflict-Averse Gradient descent (Liu et al., NeurIPS 2021).

With g0 the average gradient and phi = c² ||g0||², CAGrad's dual is
  w* = argmin_{w in simplex} g_wᵀ g0 + sqrt(phi) ||g_w||,   g_w = sum_m w_m g_m,
and the update direction is d = g0 + (sqrt(phi) / ||g_w*||) g_w*, divided by 1 + c²
(rescale=1, the authors' default), 1 + c (rescale=2) or 1 (rescale=0). All terms are Gram
quadratic forms; the dual is solved by projected gradient descent with backtracking on
the M simplex variables (`solve_dual`). d is on the scale of the AVERAGE gradient (paper
convention). ``stats()["weights"]`` are the effective multipliers (1/M + lambda w*)/rescale.
Options: c=0.5, rescale=1.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..base import GramBalancer
from ..options import check_float, check_int
from ..registry import register
from ..simplex import project_simplex


def solve_dual(k: torch.Tensor, c: float, max_iter: int = 50, tol: float = 1e-9) -> torch.Tensor:
    """argmin over the simplex of F(w) = wᵀK1/M + c ||g0|| sqrt(wᵀKw) (float64, CPU).

    Accelerated projected gradient (FISTA) with backtracking and adaptive restart finds the
    active face; `_polish` then solves the problem on that face exactly (Newton).
    """
    m = k.shape[0]
    ones = torch.full((m,), 1.0 / m, dtype=torch.float64)
    lin = k @ ones
    radius = c * max(float(ones @ k @ ones), 0.0) ** 0.5  # c ||g0||
    floor = 1e-30 * max(float(k.diagonal().sum()), 1e-300)

    def value(w: torch.Tensor) -> float:
        return float(lin @ w) + radius * max(float(w @ k @ w), floor) ** 0.5

    def grad(w: torch.Tensor) -> torch.Tensor:
        kw = k @ w
        return lin + radius * kw / max(float(w @ kw), floor) ** 0.5

    top = float(torch.linalg.eigvalsh(k)[-1])
    if not top > 0:  # all gradients zero: every w is optimal
        return ones
    step = 1.0 / top
    w = ones.clone()
    f_w = value(w)
    y, t = w.clone(), 1.0
    for _ in range(max_iter):
        f_y, g_y = value(y), grad(y)
        while True:
            cand = project_simplex(y - step * g_y)
            diff = cand - y
            f_c = value(cand)
            if f_c <= f_y + float(g_y @ diff) + float(diff @ diff) / (2 * step) or step < 1e-300:
                break
            step *= 0.5
        if f_c > f_w:  # restart: momentum made things worse
            y, t = w.clone(), 1.0
            continue
        moved = float((cand - w).abs().max())
        t_new = (1.0 + (1.0 + 4.0 * t * t) ** 0.5) / 2.0
        y = cand + ((t - 1.0) / t_new) * (cand - w)
        w, f_w, t = cand, f_c, t_new
        if moved < tol:
            break
    return _polish(k, lin, radius, w, floor)


def _polish(k: torch.Tensor, lin: torch.Tensor, radius: float, w: torch.Tensor, floor: float) -> torch.Tensor:
    """Active-set Newton refinement of ``w``; returns ``w`` unchanged if it cannot certify
    the KKT conditions (grad_j >= nu off the support, equal on it)."""
    m = k.shape[0]
    support = [i for i in range(m) if float(w[i]) > 1e-9]
    x = torch.zeros_like(w)
    x[support] = w[support] / w[support].sum()
    scale = max(float(lin.abs().max()), float(k.diagonal().max()) ** 0.5 * radius, 1e-300)
    for _ in range(4 * m):
        for _ in range(50):  # Newton on the face {x_S >= 0, sum x_S = 1}
            kx = k @ x
            n = max(float(x @ kx), floor) ** 0.5
            g = lin + radius * kx / n
            h = radius * (k / n - torch.outer(kx, kx) / n**3)
            s = torch.tensor(support)
            q = len(support)
            kkt = torch.zeros(q + 1, q + 1, dtype=k.dtype)
            kkt[:q, :q] = h[s][:, s]
            kkt[:q, q] = 1.0
            kkt[q, :q] = 1.0
            rhs = torch.zeros(q + 1, dtype=k.dtype)
            rhs[:q] = -g[s]
            try:
                delta = torch.linalg.solve(kkt, rhs)[:q]
            except RuntimeError:
                return w
            if not torch.isfinite(delta).all():
                return w
            neg = delta < 0
            t = 1.0
            if neg.any():
                t = min(1.0, float((x[s][neg] / -delta[neg]).min()))
            x[s] = (x[s] + t * delta).clamp_min(0)
            if t < 1.0:  # hit the boundary: the blocking index leaves the support
                support = [i for i in support if float(x[i]) > 0]
                x = x / x.sum()
                continue
            if float(delta.abs().max()) < 1e-15:
                break
        kx = k @ x
        g = lin + radius * kx / max(float(x @ kx), floor) ** 0.5
        nu = float(g[torch.tensor(support)].mean())
        outside = [j for j in range(m) if j not in support]
        viol = [j for j in outside if float(g[j]) < nu - 1e-12 * scale]
        if not viol:
            return x
        support.append(min(viol, key=lambda j: float(g[j])))
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

    def coefficients(self, gram: torch.Tensor) -> torch.Tensor:
        k = gram.detach().to("cpu", torch.float64)
        m = self.num_tasks
        w = solve_dual(k, self.c)
        g0_norm = max(float(k.mean()), 0.0) ** 0.5  # ||g0||² = 1ᵀK1 / M²
        gw_norm = max(float(w @ k @ w), 0.0) ** 0.5
        lam = self.c * g0_norm / gw_norm if gw_norm > 0 else 0.0
        coef = torch.full((m,), 1.0 / m, dtype=torch.float64) + lam * w
        divisor = {0: 1.0, 1: 1.0 + self.c**2, 2: 1.0 + self.c}[self.rescale]
        return (coef / divisor).to(gram.device)

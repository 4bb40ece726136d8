"""Euclidean projection onto the probability simplex."""
from __future__ import annotations

import torch


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Closest point (L2) of ``{x : x >= 0, sum(x) = 1}`` to the vector ``v`` [M].

    Sort-based algorithm (Held et al. 1974; Duchi et al. 2008): with ``u`` sorted in
    decreasing order, ``rho = max{j : u_j - (sum_{i<=j} u_i - 1) / j > 0}`` and
    ``theta = (sum_{i<=rho} u_i - 1) / rho``; the projection is ``max(v - theta, 0)``.
    """
    if v.dim() != 1 or v.numel() == 0:
        raise ValueError(f"project_simplex expects a non-empty 1-D tensor, got shape {list(v.shape)}")
    if not bool(torch.isfinite(v).all()):
        raise ValueError("project_simplex got a non-finite vector")
    u, _ = torch.sort(v, descending=True)
    css = torch.cumsum(u, 0) - 1.0
    idx = torch.arange(1, v.numel() + 1, dtype=v.dtype, device=v.device)
    cond = u - css / idx > 0
    rho = int(torch.nonzero(cond).max().item()) + 1  # cond[0] is always true
    theta = css[rho - 1] / rho
    return (v - theta).clamp_min(0)

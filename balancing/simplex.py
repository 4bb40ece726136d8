"""Euclidean projection onto the probability simplex."""
from __future__ import annotations

import math
from typing import List, Sequence

import torch


def project_simplex_values(v: Sequence[float]) -> List[float]:
    """Closest point (L2) of ``{x : x >= 0, sum(x) = 1}`` to the vector ``v`` (M floats).

    Sort-based algorithm (Held et al. 1974; Duchi et al. 2008): with ``u`` sorted in
    decreasing order, ``rho = max{j : u_j - (sum_{i<=j} u_i - 1) / j > 0}`` and
    ``theta = (sum_{i<=rho} u_i - 1) / rho``; the projection is ``max(v - theta, 0)``.
    Plain floats: M is small and this runs inside the backward pass.
    """
    values = [float(x) for x in v]
    if not values:
        raise ValueError("project_simplex expects a non-empty vector")
    if not all(math.isfinite(x) for x in values):
        raise ValueError("project_simplex got a non-finite vector")
    theta, partial = 0.0, 0.0
    for j, u in enumerate(sorted(values, reverse=True), start=1):
        partial += u
        if u - (partial - 1.0) / j > 0:  # true for j = 1, and up to rho
            theta = (partial - 1.0) / j
    return [max(x - theta, 0.0) for x in values]


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """`project_simplex_values` for a 1-D tensor [M] (same dtype and device)."""
    if v.dim() != 1 or v.numel() == 0:
        raise ValueError(f"project_simplex expects a non-empty 1-D tensor, got shape {list(v.shape)}")
    return torch.tensor(project_simplex_values(v.tolist()), dtype=v.dtype, device=v.device)

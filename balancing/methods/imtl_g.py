"""`imtl_g`: IMTL-G, the gradient-balance part of Impartial Multi-Task Learning
(Liu et al., ICLR 2021).

Find a = (a_1..a_M), sum a = 1, such that g = sum_t a_t g_t has equal projections on every
unit gradient u_t = g_t/||g_t||. Closed form (paper): with D = [g_1 - g_t]_{t>=2} and
U = [u_1 - u_t]_{t>=2} (rows), a_{2:M} = g_1 Uᵀ (D Uᵀ)^{-1}, a_1 = 1 - sum a_{2:M}.
With E = [e_1 - e_t]_{t>=2} and N = diag(1/||g_t||): D Uᵀ = E K N Eᵀ and g_1 Uᵀ = e_1ᵀ K N Eᵀ,
so only the reduced Gram K is needed. Weights sum to 1 (average scale). No options besides
``process_group``. A singular system falls back to the pseudo-inverse; on the device the
system is always solved as pinv(.) b (`device_linalg.min_norm_solve`, the same for a regular one).
"""
from __future__ import annotations

import math
from typing import Any, List, Optional

import torch

from ..base import GramBalancer
from ..device_linalg import min_norm_solve
from ..gram import GramRows
from ..registry import register
from ..small_linalg import Vector, solve


def imtl_g_values(k: GramRows) -> Vector:
    """IMTL-G closed-form weights (M floats) from the Gram matrix as rows of floats."""
    m = len(k)
    if m == 1:
        return [1.0]
    inv = [1.0 / math.sqrt(k[j][j]) if k[j][j] > 0 else 0.0 for j in range(m)]
    kn = [[k[i][j] * inv[j] for j in range(m)] for i in range(m)]
    # with E's rows e_1 - e_t:  (E A Eᵀ)_pq = A_11 - A_1,q - A_p,1 + A_pq  (p, q >= 2)
    du = [[kn[0][0] - kn[0][q] - kn[p][0] + kn[p][q] for q in range(1, m)] for p in range(1, m)]  # D Uᵀ
    g1u = [kn[0][0] - kn[0][q] for q in range(1, m)]  # g_1 Uᵀ
    rest = solve([list(col) for col in zip(*du)], g1u)  # rest · D Uᵀ = g_1 Uᵀ
    if rest is None:  # singular system: the pseudo-inverse's least-squares solution
        pinv = torch.linalg.pinv(torch.tensor(du, dtype=torch.float64))
        rest = (torch.tensor(g1u, dtype=torch.float64) @ pinv).tolist()
    return [1.0 - sum(rest)] + rest


def imtl_g_tensor(k: torch.Tensor) -> torch.Tensor:
    """`imtl_g_values` as tensor operations on K's device (no host read)."""
    if k.shape[0] == 1:
        return torch.ones_like(k[0])
    diag = k.diagonal()
    inv = torch.where(diag > 0, diag.clamp_min(1e-300).rsqrt(), 0.0)
    kn = k * inv.unsqueeze(0)
    du = kn[0, 0] - kn[0, 1:].unsqueeze(0) - kn[1:, 0].unsqueeze(1) + kn[1:, 1:]
    rest = min_norm_solve(du.transpose(0, 1), kn[0, 0] - kn[0, 1:])
    return torch.cat([1.0 - rest.sum().view(1), rest])


@register("imtl_g")
class IMTLG(GramBalancer):
    """IMTL-G closed-form weights (see module docstring)."""

    device_path = True

    def __init__(self, num_tasks: int, process_group: Optional[Any] = None) -> None:
        super().__init__(num_tasks, process_group)

    def coefficient_values(self, gram: GramRows) -> List[float]:
        return imtl_g_values(gram)

    def coefficient_tensor(self, gram: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
        return imtl_g_tensor(gram)

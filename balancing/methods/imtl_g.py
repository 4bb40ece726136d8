"""`imtl_g`: IMTL-G, the gradient-balance part of Impartial Multi-Task Learning
(Liu et al., ICLR 2021).

Find a = (a_1..a_M), sum a = 1, such that g = sum_t a_t g_t has equal projections on every
unit gradient u_t = g_t/||g_t||. Closed form (paper): with D = [g_1 - g_t]_{t>=2} and
U = [u_1 - u_t]_{t>=2} (rows), a_{2:M} = g_1 Uᵀ (D Uᵀ)^{-1}, a_1 = 1 - sum a_{2:M}.
With E = [e_1 - e_t]_{t>=2} and N = diag(1/||g_t||): D Uᵀ = E K N Eᵀ and g_1 Uᵀ = e_1ᵀ K N Eᵀ,
so only the reduced Gram K is needed. Weights sum to 1 (average scale). No options besides
``process_group``. A singular system falls back to the pseudo-inverse.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..base import GramBalancer
from ..registry import register


def imtl_g_weights(gram: torch.Tensor) -> torch.Tensor:
    """IMTL-G closed-form weights [M] (float64) from the Gram matrix."""
    k = gram.detach().to("cpu", torch.float64)
    m = k.shape[0]
    if m == 1:
        return torch.ones(1, dtype=torch.float64, device=gram.device)
    norms = k.diagonal().clamp_min(0).sqrt()
    inv = torch.where(norms > 0, 1.0 / torch.where(norms > 0, norms, torch.ones_like(norms)),
                      torch.zeros_like(norms))
    e = torch.zeros(m - 1, m, dtype=torch.float64)
    e[:, 0] = 1.0
    e[torch.arange(m - 1), torch.arange(1, m)] = -1.0
    kn = k * inv[None, :]
    du = e @ kn @ e.T          # D Uᵀ   [M-1, M-1]
    g1u = kn[0] @ e.T          # g_1 Uᵀ [M-1]
    try:
        rest = torch.linalg.solve(du.T, g1u)
        if not torch.isfinite(rest).all():
            raise RuntimeError("non-finite")
    except RuntimeError:
        rest = g1u @ torch.linalg.pinv(du)
    return torch.cat([(1.0 - rest.sum()).view(1), rest]).to(gram.device)


@register("imtl_g")
class IMTLG(GramBalancer):
    """IMTL-G closed-form weights (see module docstring)."""

    def __init__(self, num_tasks: int, process_group: Optional[Any] = None) -> None:
        super().__init__(num_tasks, process_group)

    def coefficients(self, gram: torch.Tensor) -> torch.Tensor:
        return imtl_g_weights(gram)

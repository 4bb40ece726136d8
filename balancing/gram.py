"""Gram matrix of per-task gradients and the telemetry derived from it."""
from __future__ import annotations

import torch

#: Gram matrices are accumulated in float64: the inner products of long float32 vectors lose
#: digits in float32, and float64 keeps weights equal across ranks and to a single process.
GRAM_DTYPE = torch.float64


def local_gram(grads: torch.Tensor) -> torch.Tensor:
    """Gram matrix ``G Gᵀ`` [M, M] (float64) of the flattened per-task gradients [M, ...]."""
    flat = grads.reshape(grads.shape[0], -1).to(GRAM_DTYPE)
    return flat @ flat.T


def norms_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Per-task gradient norms: square root of the Gram diagonal (clamped at 0)."""
    return gram.diagonal().clamp_min(0).sqrt()


def cosines_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarities [M, M]; 0 where a gradient is zero."""
    n = norms_from_gram(gram)
    denom = n[:, None] * n[None, :]
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.where(denom > 0, gram / safe, torch.zeros_like(gram)).clamp(-1.0, 1.0)

"""Gram matrix of per-task gradients and the telemetry derived from it."""
from __future__ import annotations

from typing import List, Sequence, Union

import torch

#: Gram matrices are returned (and reduced across ranks) in float64, so every rank derives
#: bitwise-identical weights from the reduced matrix.
GRAM_DTYPE = torch.float64

#: per-task gradients: one tensor [M, ...] or a sequence of M tensors of the same shape
TaskGrads = Union[torch.Tensor, Sequence[torch.Tensor]]
#: a small Gram matrix as M rows of M Python floats (double precision)
GramRows = List[List[float]]


def gram_rows(grads: TaskGrads) -> GramRows:
    """Gram matrix ``G Gᵀ`` of the flattened per-task gradients, as M rows of floats.

    One dot product per pair, in the gradients' dtype (float32 at least): cheaper than a
    float64 copy of all M gradients, and within float32 rounding (~1e-7 relative) of the
    exact value. Plain floats because the solvers that read it are small and run inside
    the backward pass.
    """
    work = torch.promote_types(grads[0].dtype, torch.float32)
    flat = [_flat(g, work) for g in grads]
    m = len(flat)
    pairs = [(i, j) for i in range(m) for j in range(i, m)]
    dots = torch.stack([torch.dot(flat[i], flat[j]) for i, j in pairs]).tolist()
    rows = [[0.0] * m for _ in range(m)]
    for (i, j), value in zip(pairs, dots):
        rows[i][j] = rows[j][i] = value
    return rows


def local_gram(grads: TaskGrads) -> torch.Tensor:
    """`gram_rows` as a float64 tensor [M, M] on the gradients' device."""
    return torch.tensor(gram_rows(grads), dtype=GRAM_DTYPE, device=grads[0].device)


def _flat(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``g`` as a 1-D tensor of ``dtype``, without a copy when it already is one."""
    flat = g.view(-1) if g.is_contiguous() else g.reshape(-1)
    return flat if flat.dtype == dtype else flat.to(dtype)


def norms_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Per-task gradient norms: square root of the Gram diagonal (clamped at 0)."""
    return gram.diagonal().clamp_min(0).sqrt()


def cosines_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarities [M, M]; 0 where a gradient is zero."""
    n = norms_from_gram(gram)
    denom = n[:, None] * n[None, :]
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.where(denom > 0, gram / safe, torch.zeros_like(gram)).clamp(-1.0, 1.0)

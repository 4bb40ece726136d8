"""Gram matrix of per-task gradients and the telemetry derived from it."""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch

#: Gram matrices are returned (and reduced across ranks) in float64, so every rank derives
#: bitwise-identical weights from the reduced matrix.
GRAM_DTYPE = torch.float64

#: one task's gradient: a tensor [B, ...], or its pieces (one per shared input, each [B, ...])
TaskGrad = Union[torch.Tensor, Tuple[torch.Tensor, ...]]
#: per-task gradients: one tensor [M, ...] or a sequence of M `TaskGrad` of the same shapes
TaskGrads = Union[torch.Tensor, Sequence[TaskGrad]]
#: a small Gram matrix as M rows of M Python floats (double precision)
GramRows = List[List[float]]


def gram_rows(grads: TaskGrads) -> GramRows:
    """Gram matrix ``G Gᵀ`` of the flattened per-task gradients, as M rows of floats.

    One dot product per pair (and piece), in the gradients' dtype (float32 at least):
    cheaper than a float64 copy of all M gradients, and within float32 rounding (~1e-7
    relative) of the exact value. Plain floats because the solvers that read it are small
    and run inside the backward pass.
    """
    tasks = [pieces(g) for g in grads]
    work = torch.promote_types(tasks[0][0].dtype, torch.float32)
    flat = [[_flat(p, work) for p in task] for task in tasks]
    m, n_pieces = len(flat), len(flat[0])
    pairs = [(i, j) for i in range(m) for j in range(i, m)]
    dots = torch.stack([torch.dot(flat[i][k], flat[j][k]) for i, j in pairs for k in range(n_pieces)]).tolist()
    rows = [[0.0] * m for _ in range(m)]
    for n, (i, j) in enumerate(pairs):
        rows[i][j] = rows[j][i] = sum(dots[n * n_pieces:(n + 1) * n_pieces])
    return rows


def pieces(grad: TaskGrad) -> Tuple[torch.Tensor, ...]:
    """A task's gradient as a tuple of pieces (a single tensor is one piece)."""
    return grad if isinstance(grad, tuple) else (grad,)


def local_gram(grads: TaskGrads) -> torch.Tensor:
    """`gram_rows` as a float64 tensor [M, M] on the gradients' device."""
    return torch.tensor(gram_rows(grads), dtype=GRAM_DTYPE, device=pieces(grads[0])[0].device)


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

"""Gram matrix of per-task gradients and the telemetry derived from it."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

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


def task_stacks(grads: Sequence[TaskGrad]) -> List[torch.Tensor]:
    """The per-task gradients as one [M, N] matrix per piece, in their own dtype: a view when
    the M gradients already lie one after another in one buffer (autograd handed over one
    [M, B, ...] gradient), else one stacked copy."""
    tasks = [pieces(g) for g in grads]
    m = len(tasks)
    out = []
    for k in range(len(tasks[0])):
        parts = [task[k] for task in tasks]
        first = parts[0]
        n = first.numel()
        base, step = first.data_ptr(), n * first.element_size()
        adjacent = base != 0 and all(
            p.is_contiguous() and p.data_ptr() == base + i * step for i, p in enumerate(parts)
        )
        out.append(first.as_strided((m, n), (n, 1)) if adjacent else torch.stack([p.reshape(n) for p in parts]))
    return out


def gram_of_stacks(stacks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Gram [M, M] (float64, on the stacks' device) as one matrix product per piece.
    Half-precision stacks are multiplied with float32 accumulation and output (on CUDA
    without a float32 copy of the gradients)."""
    total: Optional[torch.Tensor] = None
    for s in stacks:
        part = _self_product(s).to(GRAM_DTYPE)
        total = part if total is None else total + part
    assert total is not None
    return total


_MIXED_MM = {"cpu": False}  # device type -> torch.mm(out_dtype=float32) works for half inputs


def _self_product(s: torch.Tensor) -> torch.Tensor:
    """S Sᵀ, in float32 at least."""
    if s.dtype in (torch.float32, torch.float64):
        return s @ s.t()
    kind = s.device.type
    if _MIXED_MM.get(kind, True):
        try:
            out = torch.mm(s, s.t(), out_dtype=torch.float32)
            _MIXED_MM[kind] = True
            return out
        except torch.OutOfMemoryError:
            raise  # a real failure, not a missing kernel
        except (NotImplementedError, RuntimeError, TypeError):
            _MIXED_MM[kind] = False  # this torch/device has no mixed-precision mm
    wide = s.float()
    return wide @ wide.t()


def combine_stacks(coef: torch.Tensor, stacks: Sequence[torch.Tensor], like: TaskGrad) -> TaskGrad:
    """``sum_m coef_m g_m`` as one matrix-vector product per piece, shaped like ``like`` (one
    task's gradient: a tensor or its pieces)."""
    shapes = [p.shape for p in pieces(like)]
    out = tuple((coef.to(s.dtype) @ s).view(shape) for s, shape in zip(stacks, shapes))
    return out if isinstance(like, tuple) else out[0]


def norms_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Per-task gradient norms: square root of the Gram diagonal (clamped at 0)."""
    return gram.diagonal().clamp_min(0).sqrt()


def cosines_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarities [M, M]; 0 where a gradient is zero."""
    n = norms_from_gram(gram)
    denom = n[:, None] * n[None, :]
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.where(denom > 0, gram / safe, torch.zeros_like(gram)).clamp(-1.0, 1.0)

"""`BalancePoint`: the autograd node that hands each task its own copy of the shared tensors
and, in the single backward pass, replaces the sum of their gradients by the balanced one."""
from __future__ import annotations

import time
from typing import List, Sequence, Tuple, Union

import torch
from torch import nn

from .base import Balancer

Shared = Union[torch.Tensor, Sequence[torch.Tensor]]


class _BalanceFunction(torch.autograd.Function):
    """Forward: M views of each input. Backward: stack the M gradients, combine, split."""

    @staticmethod
    def forward(ctx, point: "BalancePoint", *tensors: torch.Tensor):  # type: ignore[override]
        ctx.point = point
        ctx.shapes = [t.shape for t in tensors]
        ctx.dtypes = [t.dtype for t in tensors]
        ctx.device = tensors[0].device
        m = point.balancer.num_tasks
        return tuple(t.view_as(t) for _ in range(m) for t in tensors)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):  # type: ignore[override]
        start = time.perf_counter()
        point: BalancePoint = ctx.point
        n, m = len(ctx.shapes), point.balancer.num_tasks
        batch = ctx.shapes[0][0]
        work = ctx.dtypes[0]
        for dt in ctx.dtypes[1:]:
            work = torch.promote_types(work, dt)
        widths = [shape[1:].numel() for shape in ctx.shapes]
        # One [M, B, K] buffer filled in place: a single copy of each task's gradient.
        stacked = torch.empty((m, batch, sum(widths)), dtype=work, device=ctx.device)
        for task in range(m):
            offset = 0
            for k, width in enumerate(widths):
                g = grads[task * n + k]
                target = stacked[task, :, offset:offset + width]
                if g is None:  # the task did not read this copy
                    target.zero_()
                else:
                    target.copy_(g.reshape(batch, width))
                offset += width
        combined = point.balancer.combine(stacked)
        outs: List[torch.Tensor] = []
        offset = 0
        for shape, dt in zip(ctx.shapes, ctx.dtypes):
            width = shape[1:].numel()
            outs.append(combined[:, offset:offset + width].reshape(shape).to(dt))
            offset += width
        point.last_balance_seconds = time.perf_counter() - start
        return (None, *outs)


class BalancePoint(nn.Module):
    """Split the shared representation into M per-task copies whose gradients are balanced.

    ``point(h)`` returns a tuple of M tensors equal to ``h`` (views: do not modify them in
    place); ``point((a, b))`` returns M tuples ``(a_m, b_m)``. In backward the M gradients of
    every input (zeros for a copy a task did not read) are flattened to [M, B, K] (features of
    all inputs concatenated), combined by ``balancer.combine`` and returned upstream, so the
    one ordinary backward continues with the balanced gradient. Inputs that do not require
    grad (or grad mode off) are passed through unchanged. All inputs share batch dim 0.
    """

    def __init__(self, balancer: Balancer) -> None:
        super().__init__()
        if not isinstance(balancer, Balancer):
            raise ValueError(f"BalancePoint needs a balancing.Balancer, got {type(balancer).__name__}")
        self.balancer = balancer
        #: wall time of the last backward through the node (combine incl. communication);
        #: on GPU this includes the host synchronisation the solvers need.
        self.last_balance_seconds: float = 0.0

    @property
    def num_tasks(self) -> int:
        return self.balancer.num_tasks

    def forward(self, shared: Shared) -> Tuple:
        single = isinstance(shared, torch.Tensor)
        tensors = [shared] if single else list(self._check_tuple(shared))
        self._check_batch(tensors)
        m = self.num_tasks
        grad_idx = [i for i, t in enumerate(tensors) if t.requires_grad and torch.is_grad_enabled()]
        copies: List[List[torch.Tensor]] = [list(tensors) for _ in range(m)]
        if grad_idx:
            outs = _BalanceFunction.apply(self, *[tensors[i] for i in grad_idx])
            n = len(grad_idx)
            for task in range(m):
                for j, i in enumerate(grad_idx):
                    copies[task][i] = outs[task * n + j]
        if single:
            return tuple(c[0] for c in copies)
        return tuple(tuple(c) for c in copies)

    @staticmethod
    def _check_tuple(shared: object) -> Sequence[torch.Tensor]:
        if not isinstance(shared, (tuple, list)) or not shared or not all(
            isinstance(t, torch.Tensor) for t in shared
        ):
            raise ValueError(
                "BalancePoint expects a tensor or a non-empty tuple of tensors, got "
                f"{type(shared).__name__}"
            )
        return shared

    @staticmethod
    def _check_batch(tensors: Sequence[torch.Tensor]) -> None:
        if any(t.dim() < 1 for t in tensors):
            raise ValueError("BalancePoint inputs need a batch dimension (dim 0); got a 0-d tensor")
        sizes = {t.shape[0] for t in tensors}
        if len(sizes) != 1:
            raise ValueError(f"BalancePoint inputs must share the batch size (dim 0), got {sorted(sizes)}")

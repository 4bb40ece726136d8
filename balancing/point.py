"""`BalancePoint`: the autograd node that hands each task its own copy of the shared tensors
and, in the single backward pass, replaces the sum of their gradients by the balanced one."""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .base import Balancer
from .gram import TaskGrad
from .telemetry import BackwardTiming

Shared = Union[torch.Tensor, Sequence[torch.Tensor]]


class _BalanceFunction(torch.autograd.Function):
    """Forward: M views of each input. Backward: the M per-task gradients -> combine -> split."""

    @staticmethod
    def forward(ctx, point: "BalancePoint", *tensors: torch.Tensor):  # type: ignore[override]
        ctx.balancer = point.balancer
        ctx.timing = point.timing
        ctx.shapes = [t.shape for t in tensors]
        ctx.dtypes = [t.dtype for t in tensors]
        ctx.device = tensors[0].device
        ctx.work = ctx.dtypes[0]
        for dt in ctx.dtypes[1:]:
            ctx.work = torch.promote_types(ctx.work, dt)
        m = point.balancer.num_tasks
        return tuple(t.view_as(t) for _ in range(m) for t in tensors)

    @staticmethod
    def backward(ctx, *grads: Optional[torch.Tensor]):  # type: ignore[override]
        ctx.timing.start(ctx.device)
        n, m = len(ctx.shapes), ctx.balancer.num_tasks
        if n == 1 and all(g is not None for g in grads):
            per_task: Sequence[TaskGrad] = grads  # one input: the gradients as autograd produced them
        else:
            per_task = [_task_gradient(grads[task * n:(task + 1) * n], ctx) for task in range(m)]
        combined = ctx.balancer.combine_in_backward(per_task)
        pieces = combined if n > 1 else (combined,)
        outs = [p if p.dtype == dt else p.to(dt) for p, dt in zip(pieces, ctx.dtypes)]
        ctx.timing.stop()
        return (None, *outs)


def _task_gradient(grads: Sequence[Optional[torch.Tensor]], ctx: Any) -> TaskGrad:
    """One task's gradient w.r.t. the shared inputs, as received (no copy): a tensor for one
    input, a tuple of pieces for several; zeros for a copy the task did not read."""
    filled = tuple(
        torch.zeros(shape, dtype=ctx.work, device=ctx.device) if g is None else g.to(ctx.work)
        for g, shape in zip(grads, ctx.shapes)
    )
    return filled[0] if len(filled) == 1 else filled


class PointBase(nn.Module):
    """What every balance point has: its balancer (of the type it needs), the timing of its
    last backward, and the number of tasks."""

    balancer_type: type = Balancer

    def __init__(self, balancer: Balancer) -> None:
        super().__init__()
        if not isinstance(balancer, self.balancer_type):
            raise ValueError(f"{type(self).__name__} needs {self.balancer_type.__name__!r} as its balancer, "
                             f"got {type(balancer).__name__}")
        self.balancer = balancer
        self.timing = BackwardTiming()

    @property
    def last_balance_seconds(self) -> float:
        """Time of the last backward through the node (combine incl. communication): GPU time
        between CUDA events on GPU (reading it waits for the node's own kernels only), wall
        time on CPU. Either way it excludes waiting for work queued before the node."""
        return self.timing.seconds

    @property
    def num_tasks(self) -> int:
        return self.balancer.num_tasks


class BalancePoint(PointBase):
    """Split the shared representation into M per-task copies whose gradients are balanced.

    ``point(h)`` returns a tuple of M tensors equal to ``h`` (views: do not modify them in
    place); ``point((a, b))`` returns M tuples ``(a_m, b_m)``. In backward the M gradients
    (zeros for a copy a task did not read; for several inputs, each task's gradient in
    pieces, one per input) are combined by ``balancer.combine`` and returned upstream, so the
    one ordinary backward continues with the balanced gradient. Inputs that do not require
    grad (or grad mode off) are passed through unchanged. All inputs share batch dim 0.
    """

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

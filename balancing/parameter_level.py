"""Balancing at the parameter level: the classic papers' formulation, kept as the reference
whose cost the MultiBalance paper reports (70-80% QPS loss). Per-task gradients of the
shared dense parameters come from M extra backward passes through the shared part, are
summed over ranks (M x P numbers: the global-batch gradients), combined by the same
balancer objects, and replace the shared parameters' gradients before the optimizer step.
Embeddings and task-specific parameters keep the gradient of the summed loss."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from .base import Balancer
from .distributed import is_distributed


def own_rank_group() -> object | None:
    """A process group holding only this rank: the per-task gradients are already global
    when the balancer sees them, so its Gram must not be reduced again. Every rank must call
    this (creating a group is collective)."""
    if not is_distributed():
        return None
    mine = None
    for r in range(dist.get_world_size()):
        group = dist.new_group(ranks=[r])
        if r == dist.get_rank():
            mine = group
    return mine


class ParameterLevelBalancing:
    """The same balancer objects on the flattened gradients of ``shared_params`` (global
    batch), after the ordinary backward (see the module docstring)."""

    #: True when `apply` updates the parameters itself (the optimizer must leave them out);
    #: False: it writes their gradients and the optimizer steps as usual
    owns_update = False

    def __init__(self, shared_params: Iterable[nn.Parameter], balancer: Balancer) -> None:
        self.params = [p for p in shared_params if p.requires_grad]
        self.balancer = balancer

    def per_task_gradients(self, losses: torch.Tensor, objective: torch.Tensor) -> torch.Tensor:
        """[M, P] global-batch gradients of each task's term of `objective` w.r.t. the shared
        dense parameters. `losses` are the per-task losses `objective` was built from; a
        loss-level transform (uncertainty, DB-MTL's log) enters through d objective / d L_m."""
        coefficients = torch.autograd.grad(objective, losses, retain_graph=True)[0]
        rows = []
        for m in range(losses.shape[0]):
            grads = torch.autograd.grad(losses[m], self.params, retain_graph=True, allow_unused=True)
            flat = torch.cat([
                (g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, self.params)
            ])
            rows.append(flat * coefficients[m])
        per_task = torch.stack(rows)
        if is_distributed():
            dist.all_reduce(per_task)
        return per_task

    def apply(self, per_task: torch.Tensor) -> None:
        """Write the combined gradient into the shared parameters' .grad (after the ordinary
        backward, whose DDP reduction of these parameters it replaces)."""
        combined = self.balancer.combine(per_task.unsqueeze(1)).reshape(-1)
        offset = 0
        for p in self.params:
            n = p.numel()
            value = combined[offset : offset + n].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = value.clone()
            else:  # in place: DDP's gradients are views into its buckets
                p.grad.copy_(value)
            offset += n

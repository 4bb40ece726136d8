"""Non-finite steps: skipped on every rank alike, with nothing touched. The embedding
optimizer is fused into the backward, so the check must happen INSIDE the backward, at the
gradient entering the embedding tables: if any rank sees a non-finite value there, every
rank zeroes it (a zero gradient leaves SGD/Adagrad weights and states unchanged) and the
dense optimizer step is skipped. One all-reduced number per step."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class NonFiniteGuard:
    def __init__(self, sparse_module: nn.Module) -> None:
        self.tripped = False
        sparse_module.register_forward_hook(self._attach)

    def _attach(self, module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        if output.requires_grad:
            output.register_hook(self._check)

    def _check(self, grad: torch.Tensor) -> torch.Tensor:
        bad = torch.tensor([0.0 if bool(torch.isfinite(grad).all()) else 1.0])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        self.tripped = bool(bad[0])
        return torch.zeros_like(grad) if self.tripped else grad

    def begin_step(self) -> None:
        self.tripped = False


def grads_finite(params: list[nn.Parameter]) -> bool:
    """Dense gradients are identical on every rank after DDP's all-reduce: no communication."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())


class NonFiniteLimitError(RuntimeError):
    """Too many non-finite steps in a row; a checkpoint was saved before stopping."""

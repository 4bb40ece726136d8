"""Non-finite steps: skipped on every rank alike, with nothing touched. The embedding
optimizer is fused into the backward, so the check must happen INSIDE the backward, at the
gradient entering the embedding tables: if any rank sees a non-finite value there, every
rank zeroes it (a zero gradient leaves SGD/Adagrad weights and states unchanged) and the
dense optimizer step is skipped. One all-reduced number per step. On GPU the flag stays on
the device inside the backward and is read once, after it (`step_is_finite`)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from balancing.distributed import is_distributed
from torch import nn


class NonFiniteGuard:
    def __init__(self, sparse_module: nn.Module) -> None:
        self._bad: torch.Tensor | None = None
        sparse_module.register_forward_hook(self._attach)

    def _attach(self, module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        if output.requires_grad:
            output.register_hook(self._check)

    def _check(self, grad: torch.Tensor) -> torch.Tensor:
        bad = (~torch.isfinite(grad).all()).to(torch.float32).reshape(1)
        if is_distributed():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        self._bad = bad
        if grad.device.type == "cpu":  # a host read costs nothing here, and skips a pass over grad
            return torch.zeros_like(grad) if bool(bad[0]) else grad
        return torch.where(bad.bool(), torch.zeros_like(grad), grad)

    @property
    def tripped(self) -> bool:
        """Whether this step's embedding gradient was non-finite on some rank (a host read)."""
        return self._bad is not None and bool(self._bad[0])

    def begin_step(self) -> None:
        self._bad = None

    def step_is_finite(self, params: list[nn.Parameter]) -> bool:
        """The guard's flag and the dense gradients (identical on every rank after DDP's
        all-reduce, so no communication) in ONE host read."""
        grads = [p.grad for p in params if p.grad is not None]
        ok = torch.isfinite(torch.stack(torch._foreach_norm(grads))).all() if grads else None
        if self._bad is not None:
            fine = ~self._bad[0].bool()
            ok = fine if ok is None else ok & fine.to(ok.device)
        return True if ok is None else bool(ok)


class NonFiniteLimitError(RuntimeError):
    """Too many non-finite steps in a row; a checkpoint was saved before stopping."""

"""PUB in the trainer: the shared dense parameters are updated by `balancing.methods.pub.PUB`
(per-task Adam updates combined with Nash-bargaining weights α) instead of the dense Adam.

Per step (``balance.method = "pub"``; ``balance.level`` is ignored — PUB always acts on
parameters):
- the model's balance point passes the plain sum (method ``equal``), so embeddings and
  task-specific dense parameters get the ordinary gradient of the summed loss from the ONE
  ordinary backward: embeddings keep their fused optimizer (summed gradient), task-specific
  dense parameters (gates, towers) keep plain Adam;
- the per-task gradients of the shared dense parameters (`MultiTaskRanker.shared_dense_parameters`)
  come from M extra ``autograd.grad`` calls that stop at those parameters (they do not reach
  the embeddings), are summed over ranks (one all-reduce of M x P numbers), so PUB sees the
  global-batch gradients and every rank computes the same α and the same update;
- PUB's update ``-lr · Σ α_t u_t`` is added to the shared parameters after the backward,
  and their ``.grad`` (the DDP-reduced summed gradient, unused) is dropped.

PUB's state (Adam moments of the shared parameters, step, α, failure count) is a submodule
of the model (``parameter_balancer``) and therefore in the model's state_dict / checkpoint.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from balancing.methods.pub import PUB
from balancing.parameter_level import ParameterLevelBalancing


class PUBLevel(ParameterLevelBalancing):
    """Same interface as `ParameterLevelBalancing` (per_task_gradients, apply), so the
    Trainer's train_step drives it unchanged; `apply` writes the parameter update itself."""

    def __init__(self, shared_params: Iterable[nn.Parameter], balancer: PUB, dense_lr: float) -> None:
        if not isinstance(balancer, PUB):
            raise ValueError(f"PUBLevel needs the 'pub' balancer, got {type(balancer).__name__}")
        super().__init__(shared_params, balancer)
        if balancer.lr is None:
            balancer.lr = dense_lr
        first = self.params[0]
        balancer.reset_state(sum(p.numel() for p in self.params), first.dtype, first.device)

    @property
    def lr(self) -> float:
        return float(self.balancer.lr)

    def apply(self, per_task: torch.Tensor) -> None:
        """``p -= lr · Σ α_t u_t`` for the shared parameters; their .grad is dropped."""
        combined = self.balancer.combine(per_task.unsqueeze(1)).reshape(-1)
        finite = bool(torch.isfinite(combined).all())
        offset = 0
        with torch.no_grad():
            for p in self.params:
                n = p.numel()
                if finite:
                    p.add_(combined[offset : offset + n].view_as(p).to(p.dtype), alpha=-self.lr)
                p.grad = None
                offset += n

    def make_optimizer(self, dmp: DistributedModelParallel, dense_lr: float) -> CombinedOptimizer:
        """The fused embedding optimizer + Adam for the dense parameters PUB does not own."""
        owned = {id(p) for p in self.params}
        dense = {n: p for n, p in in_backward_optimizer_filter(dmp.named_parameters()) if id(p) not in owned}
        optimizers = [dmp.fused_optimizer]
        if dense:
            optimizers.append(KeyedOptimizerWrapper(dense, lambda params: torch.optim.Adam(params, lr=dense_lr)))
        return CombinedOptimizer(optimizers)

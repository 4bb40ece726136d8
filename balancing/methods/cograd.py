"""`cograd`: CoGrad gradient correction (Eq. 10 with the Hessian approximation of Eq. 11).

  ĝ_i = g_i - sum_{j != i} gamma_j H_i g_j,   combined = sum_i w_i ĝ_i
form="fisher" (default, Eq. 11): H_i g_j ≈ p_i ⊙ p_i ⊙ g_j
form="algorithm1" (the product printed in the paper's Algorithm 1): H_i g_j ≈ p_i ⊙ g_j
where p_i is the gradient of each sample's OWN loss for task i. At the representation, the
row of a batch-mean loss gradient belonging to sample b is 1/B_global of that sample's own
gradient, so p_i = g_i * B_global (B_global = local batch * world size; equal local batch
sizes assumed) and gamma means the same for every batch size. ``per_sample=False`` uses the
batch-mean g_i itself inside the products (the paper's parameter-level formula verbatim).
Element-wise: no communication is needed for the combine. ``stats()`` grad_norms/cosines
still come from the reduced Gram (M² numbers a step) -- telemetry only, not used here.
Options: gamma=0.1 (number or M numbers, indexed by j), weights (M numbers, default ones),
form="fisher", per_sample=True.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch

from ..base import Balancer
from ..distributed import world_size
from ..options import check_bool, check_choice, check_per_task
from ..registry import register


@register("cograd")
class CoGrad(Balancer):
    """CoGrad (see module docstring). Stateless apart from the step counter."""

    def __init__(
        self,
        num_tasks: int,
        gamma: Union[float, Sequence[float]] = 0.1,
        weights: Optional[Sequence[float]] = None,
        form: str = "fisher",
        per_sample: bool = True,
        process_group: Optional[Any] = None,
    ) -> None:
        super().__init__(num_tasks, process_group)
        self.gamma = torch.tensor(check_per_task("gamma", gamma, num_tasks), dtype=torch.float64)
        w = [1.0] * num_tasks if weights is None else check_per_task("weights", weights, num_tasks, low=0.0)
        self.weights = torch.tensor(w, dtype=torch.float64)
        self.form = check_choice("form", form, ("fisher", "algorithm1"))
        self.per_sample = check_bool("per_sample", per_sample)

    def _combine(self, grads: torch.Tensor) -> torch.Tensor:
        self._global_gram(grads)  # telemetry only
        work = torch.promote_types(grads.dtype, torch.float32)
        g = grads.to(work)
        m = self.num_tasks
        shape = (m,) + (1,) * (g.dim() - 1)
        gamma = self.gamma.to(device=g.device, dtype=work).view(shape)
        weights = self.weights.to(device=g.device, dtype=work).view(shape)
        p = g * float(g.shape[1] * world_size(self.process_group)) if self.per_sample else g
        cross = (gamma * g).sum(0, keepdim=True) - gamma * g  # sum_{j != i} gamma_j g_j
        hess = p * p if self.form == "fisher" else p
        corrected = g - hess * cross
        self._weights = self.weights.clone()
        self._advance()
        return (weights * corrected).sum(0).to(grads.dtype)

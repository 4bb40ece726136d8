"""`nashmtl`: Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022).

Weights alpha > 0 solving (GᵀG) alpha = 1/alpha, combined = sum_m alpha_m g_m. As in the
authors' code, GᵀG (the reduced Gram) is first divided by its Frobenius norm
(``normalize=True``), which makes the combined gradient's scale follow the gradients' scale.
Solved by `balancing.nash.nash_task_weights` (damped Newton), warm-started from the
previous alpha (buffer ``alpha``). Tasks with a zero gradient get alpha = 0 and are left
out of the solve. If the solve does not converge (e.g. exactly opposite gradients, where no
solution exists) the previous alpha is kept, as the authors do, and ``failed_solves`` counts
it. Options: normalize=True, max_iter=100, tol=1e-9, ridge=0.0.
"""
from __future__ import annotations

from typing import Any, List, Optional

import torch

from ..base import GramBalancer
from ..gram import GramRows
from ..nash import nash_task_weights
from ..options import check_bool, check_float, check_int
from ..registry import register


@register("nashmtl")
class NashMTL(GramBalancer):
    """Nash-MTL bargaining weights (see module docstring)."""

    def __init__(
        self,
        num_tasks: int,
        normalize: bool = True,
        max_iter: int = 100,
        tol: float = 1e-9,
        ridge: float = 0.0,
        process_group: Optional[Any] = None,
    ) -> None:
        super().__init__(num_tasks, process_group)
        self.normalize = check_bool("normalize", normalize)
        self.max_iter = check_int("max_iter", max_iter, low=1)
        self.tol = check_float("tol", tol, low=0.0, low_inclusive=False)
        self.ridge = check_float("ridge", ridge, low=0.0)
        self.register_buffer("alpha", torch.ones(num_tasks, dtype=torch.float64))
        self.register_buffer("failed_solves", torch.zeros((), dtype=torch.long))

    def coefficient_values(self, gram: GramRows) -> List[float]:
        previous = self.alpha.tolist()
        alpha = nash_task_weights(gram, previous, self.normalize, self.max_iter, self.tol, self.ridge)
        if alpha is None:
            self.failed_solves += 1
            return previous
        self.alpha.copy_(torch.tensor(alpha, dtype=torch.float64))
        return alpha

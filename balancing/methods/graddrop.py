"""`graddrop`: Gradient Sign Dropout (Chen et al., "Just Pick a Sign", NeurIPS 2020).

Element-wise, per entry of the representation gradient:
  P   = ½ (1 + sum_i g_i / sum_i |g_i|)          (sign purity; ½ where all g_i are 0)
  M_i = 1[P > U] 1[g_i > 0] + 1[P < U] 1[g_i < 0],  U ~ Uniform(0, 1)
  combined = sum_i (l_i + (1 - l_i) M_i) g_i     (leak l_i; pure GradDrop: l = 0)
The paper multiplies the gradients by sign(A) of the activations first; since P -> 1-P and
1[g>0] <-> 1[g<0] together where A < 0 and U is symmetric, the masked gradient has the same
distribution without it, so the node does not need the activations. Tasks share every
example here (not "batch-separated"), so no sum over the batch. No communication: U comes
from a generator seeded by (``seed``, step, rank), so ranks draw independent masks and a
reload reproduces them. ``stats()["weights"]`` is None. Options: leak=0.0 (number or M
numbers in [0, 1]), seed=0.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

import torch

from ..base import Balancer
from ..distributed import rank
from ..options import check_int, check_per_task
from ..registry import register
from ..rng import step_generator


@register("graddrop")
class GradDrop(Balancer):
    """GradDrop (see module docstring)."""

    def __init__(
        self,
        num_tasks: int,
        leak: Union[float, Sequence[float]] = 0.0,
        seed: int = 0,
        process_group: Optional[Any] = None,
    ) -> None:
        super().__init__(num_tasks, process_group)
        self.leak = torch.tensor(check_per_task("leak", leak, num_tasks, low=0.0, high=1.0), dtype=torch.float64)
        self.register_buffer("seed", torch.tensor(check_int("seed", seed, low=0), dtype=torch.long))

    def _combine(self, grads: Tuple[torch.Tensor, ...]) -> torch.Tensor:
        self._global_gram(grads)  # telemetry only
        g = torch.stack(grads).to(torch.promote_types(grads[0].dtype, torch.float32))
        total, total_abs = g.sum(0), g.abs().sum(0)
        purity = torch.where(total_abs > 0, total / torch.where(total_abs > 0, total_abs, torch.ones_like(total_abs)),
                             torch.zeros_like(total))
        prob = 0.5 * (1.0 + purity)
        gen = step_generator(int(self.seed), self.steps_done, g.device, salt=rank(self.process_group))
        u = torch.rand(prob.shape, generator=gen, device=g.device, dtype=g.dtype)
        keep = ((prob > u) & (g > 0)) | ((prob < u) & (g < 0))
        leak = self.leak.to(device=g.device, dtype=g.dtype).view((-1,) + (1,) * (g.dim() - 1))
        self._last.weights = None
        self._advance()
        return ((leak + (1 - leak) * keep.to(g.dtype)) * g).sum(0).to(grads[0].dtype)

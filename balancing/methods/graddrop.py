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

from ..base import Balancer, plain_sum, work_dtype
from ..distributed import rank
from ..options import check_per_task
from ..registry import register
from ..rng import SeededState, step_generator


@register("graddrop")
class GradDrop(SeededState, Balancer):
    """GradDrop (see module docstring)."""

    def __init__(
        self,
        num_tasks: int,
        leak: Union[float, Sequence[float]] = 0.0,
        seed: int = 0,
        process_group: Optional[Any] = None,
    ) -> None:
        super().__init__(num_tasks, process_group)
        self.leak = tuple(float(x) for x in check_per_task("leak", leak, num_tasks, low=0.0, high=1.0))
        self._init_seed(seed)

    def _combine(self, grads: Tuple[torch.Tensor, ...]) -> torch.Tensor:
        self._telemetry_gram(grads)
        work = work_dtype(grads, self.on_device(grads))
        g = [t if t.dtype == work else t.to(work) for t in grads]
        # M_i g_i = 1[P > U] relu(g_i) - 1[P < U] relu(-g_i), and P = sum relu(g) / sum |g|, so
        # with up = sum relu(g) and down = sum relu(-g) = up - sum g:  P > U <=> up > U (up + down).
        # Sums over tasks of one shape, no [M, ...] stack; a non-finite gradient stays non-finite.
        rising = [t.clamp_min(0) for t in g]
        up = plain_sum(rising)
        down = up - plain_sum(g)
        gen = step_generator(self._seed, self.steps_done, g[0].device, salt=rank(self.process_group))
        threshold = torch.rand(up.shape, generator=gen, device=up.device, dtype=up.dtype).mul_(up + down)
        keep_up, keep_down = up > threshold, up < threshold
        leak = self.leak
        if any(leak):  # sum_i l_i g_i + the masked sums weighted by (1 - l_i)
            up = plain_sum([r * (1 - l) for r, l in zip(rising, leak)])
            down = plain_sum([(r - t) * (1 - l) for r, t, l in zip(rising, g, leak)])
        out = up.mul_(keep_up).sub_(down.mul_(keep_down))
        if any(leak):
            out.add_(plain_sum([t * l for t, l in zip(g, leak)]))
        self._last.weights = None
        self._advance()
        return out.to(grads[0].dtype)

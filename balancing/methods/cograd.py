"""`cograd`: CoGrad gradient correction (Eq. 10 with the Hessian approximation of Eq. 11).

  ĝ_i = g_i - sum_{j != i} gamma_j H_i g_j,   combined = sum_i w_i ĝ_i
form="fisher" (Eq. 11): H_i g_j ≈ p_i ⊙ p_i ⊙ g_j; form="algorithm1" (the product printed in
Algorithm 1): p_i ⊙ g_j. At the representation p_i is each sample's own gradient (the
batch-mean gradient times the global batch, ``per_sample``), so gamma means the same for
every batch size; ``per_sample=False`` is the paper's parameter-level formula verbatim.
Element-wise: the combine needs no communication (the Gram is telemetry only).
Options: gamma=10 (number or M numbers, indexed by j), weights (M numbers, default ones, or
"prior_entropy": the paper's loss weights 1/H(label rate)), form="fisher", per_sample=True,
track_correction=False (the correction's relative size per step, for sweeps; kept on the device).
The gamma sweep behind the default and the paper's own setting: docs/methods.md.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple, Union

import torch

from ..base import Balancer, TaskInfo, weighted_sum, work_dtype
from ..distributed import all_reduce_sum
from ..gram import TaskGrad
from ..options import check_bool, check_choice, check_per_task
from ..registry import register


PRIOR_ENTROPY = "prior_entropy"


def prior_entropy_weights(rates: Sequence[float]) -> list[float]:
    """1 / H(p) per task, H(p) = -(p log p + (1-p) log(1-p)) the log loss of always predicting
    the label rate p: with these weights a task's weighted loss is its NE. A rate of 0 or 1
    (a constant label) has no entropy to scale by and gets weight 0."""
    out = []
    for p in rates:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"cograd: a label rate must be in [0, 1], got {p!r}")
        h = -(p * math.log(p) + (1 - p) * math.log(1 - p)) if 0.0 < p < 1.0 else 0.0
        out.append(1.0 / h if h > 0 else 0.0)
    return out


@register("cograd")
class CoGrad(Balancer):
    """CoGrad (see module docstring). Stateless apart from the step counter."""

    supports_pieces = True

    def __init__(
        self,
        num_tasks: int,
        gamma: Union[float, Sequence[float]] = 10.0,
        weights: Union[None, str, Sequence[float]] = None,
        form: str = "fisher",
        per_sample: bool = True,
        track_correction: bool = False,
        process_group: Optional[Any] = None,
    ) -> None:
        super().__init__(num_tasks, process_group)
        self.gamma = tuple(check_per_task("gamma", gamma, num_tasks))
        if isinstance(weights, str) and weights != PRIOR_ENTROPY:
            raise ValueError(f"balance option 'weights' must be {num_tasks} numbers >= 0 or '{PRIOR_ENTROPY}', "
                             f"got {weights!r}")
        self.prior_entropy = weights == PRIOR_ENTROPY
        if self.prior_entropy or weights is None:
            w = [1.0] * num_tasks  # prior_entropy: set by bind_tasks
        else:
            w = check_per_task("weights", weights, num_tasks, low=0.0)
        self.weights = tuple(w)
        self._bound = not self.prior_entropy
        self.form = check_choice("form", form, ("fisher", "algorithm1"))
        self.per_sample = check_bool("per_sample", per_sample)
        #: measure ||correction|| / ||sum_i w_i g_i|| each step (global batch; reads it on the host)
        self.track_correction = check_bool("track_correction", track_correction)
        self._ratio_sum: Optional[torch.Tensor] = None  # device tensors, read in extra_stats
        self._ratio_last: Optional[torch.Tensor] = None
        self._ratio_steps = 0

    @property
    def needs_label_rates(self) -> bool:
        return self.prior_entropy

    def bind_tasks(self, info: TaskInfo) -> None:
        super().bind_tasks(info)
        if not self.prior_entropy:
            return
        if info.label_rates is None:
            raise ValueError("cograd: weights='prior_entropy' needs the tasks' training label rates")
        self.weights = tuple(prior_entropy_weights(info.label_rates))
        self._bound = True

    def _combine(self, grads: Tuple[TaskGrad, ...]) -> TaskGrad:
        if not self._bound:
            raise RuntimeError("cograd: weights='prior_entropy' are unknown until bind_tasks() gives the label rates")
        self._telemetry_gram(grads)
        parts = [[g[k] for g in grads] for k in range(len(grads[0]))] if isinstance(grads[0], tuple) else [grads]
        outs = [self._corrected(p) for p in parts]  # element-wise: piece by piece
        out: TaskGrad = tuple(outs) if isinstance(grads[0], tuple) else outs[0]
        if self.track_correction:
            self._track([weighted_sum(self.weights, p) for p in parts], outs)
        self._last.weights = self.weights
        self._advance()
        return out

    def _track(self, plain: Sequence[torch.Tensor], corrected: Sequence[torch.Tensor]) -> None:
        """||corrected - plain|| / ||plain|| over the global batch, kept on the gradients'
        device (read only by `extra_stats`, at log time)."""
        sums = torch.stack([
            sum(((c.double() - p.double()) ** 2).sum() for p, c in zip(plain, corrected)),
            sum((p.double() ** 2).sum() for p in plain),
        ])
        correction, base = all_reduce_sum(sums, self.process_group).unbind()
        ratio = torch.where(base > 0, (correction / torch.where(base > 0, base, 1.0)).sqrt(), 0.0)
        self._ratio_last = ratio
        self._ratio_sum = ratio if self._ratio_sum is None else self._ratio_sum + ratio
        self._ratio_steps += 1

    def extra_stats(self) -> dict:
        """With ``track_correction``: the correction's size relative to the plain weighted sum."""
        if not self.track_correction:
            return {}
        if self._ratio_sum is None:
            return {"correction_ratio_last": 0.0, "correction_ratio_mean": 0.0, "correction_steps": 0}
        return {"correction_ratio_last": float(self._ratio_last), "correction_ratio_mean":
                float(self._ratio_sum) / self._ratio_steps, "correction_steps": self._ratio_steps}

    def _corrected(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """sum_i w_i ĝ_i for per-task tensors of one shape [B, ...]."""
        on_device = self.on_device(grads)
        work = work_dtype(grads, on_device)
        g = [t if t.dtype == work else t.to(work) for t in grads]
        w, gamma = self.weights, self.gamma
        scale = float(g[0].shape[0] * self._world_size()) if self.per_sample else 1.0
        # sum_i w_i ĝ_i = sum_i w_i g_i - sum_i sum_{j != i} w_i gamma_j H_i g_j, gathered by
        # pairs i < j so that each product g_i ⊙ g_j is formed once:
        #   fisher:     H_i g_j = scale² g_i ⊙ g_i ⊙ g_j
        #               -> (g_i ⊙ g_j) ⊙ (w_i gamma_j g_i + w_j gamma_i g_j) scale²
        #   algorithm1: H_i g_j = scale g_i ⊙ g_j -> (g_i ⊙ g_j) (w_i gamma_j + w_j gamma_i) scale
        out = weighted_sum(w, g, on_device)
        for i in range(self.num_tasks):
            for j in range(i + 1, self.num_tasks):
                both = g[i] * g[j]
                if self.form == "fisher":
                    out.addcmul_(both, g[i], value=-scale * scale * w[i] * gamma[j])
                    out.addcmul_(both, g[j], value=-scale * scale * w[j] * gamma[i])
                else:
                    out.add_(both, alpha=-scale * (w[i] * gamma[j] + w[j] * gamma[i]))
        return out.to(grads[0].dtype)

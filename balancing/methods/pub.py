"""`pub`: Parameter Update Balancing (PUB paper, Alg. 1 with Adam) -- balances the optimizer's
UPDATES of the shared parameters, not their gradients.

Per step, from the per-task gradients g_t (rows, flattened) and the CURRENT Adam moments:
u_t = Adam's bias-corrected update of g_t alone; every ``every`` steps α > 0 solving
(UᵀU) α = 1/α (damped Newton, `balancing.nash.nash_task_weights`; UᵀU divided by its
Frobenius norm when ``normalize``, as the authors' code does, or not, as the paper writes:
that only scales α); combined update Σ α_t u_t; the moments advance with g_α = Σ α_t g_t.
``step="adam"`` (default) rescales α so the update's norm equals Adam's update of the summed
gradient (PUB changes the direction, not the learning rate); ``step="solved"`` keeps the
solved scale. With one task this is Adam. The trainer feeds global-batch gradients of the
shared dense parameters and applies ``p -= lr · combined`` (`PUBStep`). Details,
choices and what is not implemented: docs/methods.md.
Options: every=10, betas=(0.9, 0.999), eps=1e-8, lr=None (train.dense_lr), normalize=True,
step="adam", max_iter=100, tol=1e-9, ridge=0.0.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

import torch
from torch import nn

from ..base import Balancer, plain_sum
from ..distributed import reduce_gram
from ..gram import cosines_from_gram, local_gram, norms_from_gram
from ..nash import nash_task_weights
from ..parameter_level import ParameterLevelBalancing
from ..options import check_bool, check_choice, check_float, check_int
from ..registry import register


STEP_SIZES = ("adam", "solved")


def _check_betas(value: object) -> tuple[float, float]:
    if hasattr(value, "tolist"):
        value = value.tolist()  # type: ignore[union-attr]
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"balance option 'betas' must be a list of 2 numbers in [0, 1), got {value!r}")
    b1 = check_float("betas[0]", value[0], 0.0, 1.0, high_inclusive=False)
    b2 = check_float("betas[1]", value[1], 0.0, 1.0, high_inclusive=False)
    return b1, b2


@register("pub")
class PUB(Balancer):
    """Parameter Update Balancing (see module docstring)."""

    levels = ("parameters",)

    @classmethod
    def parameter_step(cls, shared_params: Iterable[nn.Parameter], balancer: Balancer, lr: float,
                       weight_decay: float) -> "PUBStep":
        return PUBStep(shared_params, balancer, lr, weight_decay)  # type: ignore[arg-type]

    def __init__(
        self,
        num_tasks: int,
        every: int = 10,
        betas: Sequence[float] = (0.9, 0.999),
        eps: float = 1e-8,
        lr: Optional[float] = None,
        normalize: bool = True,
        step: str = "adam",
        max_iter: int = 100,
        tol: float = 1e-9,
        ridge: float = 0.0,
        process_group: Optional[Any] = None,
    ) -> None:
        super().__init__(num_tasks, process_group)
        self.every = check_int("every", every, low=1)
        self.betas = _check_betas(betas)
        self.eps = check_float("eps", eps, low=0.0)
        self.lr = None if lr is None else check_float("lr", lr, low=0.0, low_inclusive=False)
        self.normalize = check_bool("normalize", normalize)
        self.step_size = check_choice("step", step, STEP_SIZES)
        self.max_iter = check_int("max_iter", max_iter, low=1)
        self.tol = check_float("tol", tol, low=0.0, low_inclusive=False)
        self.ridge = check_float("ridge", ridge, low=0.0)
        self.register_buffer("exp_avg", torch.zeros(0))
        self.register_buffer("exp_avg_sq", torch.zeros(0))
        self.register_buffer("alpha", torch.ones(num_tasks, dtype=torch.float64))
        self.register_buffer("failed_solves", torch.zeros((), dtype=torch.long))
        self.register_buffer("solves", torch.zeros((), dtype=torch.long))
        self._update_cosines = torch.zeros(num_tasks, num_tasks, dtype=torch.float64)
        self._converged = True
        self._step_scale = 1.0

    # ----------------------------------------------------------------- state
    def reset_state(self, numel: int, dtype: torch.dtype = torch.float32, device: Any = None) -> None:
        """Zero moments for ``numel`` parameters (call before loading a checkpoint)."""
        self.exp_avg = torch.zeros(numel, dtype=dtype, device=device)
        self.exp_avg_sq = torch.zeros(numel, dtype=dtype, device=device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        for name in ("exp_avg", "exp_avg_sq"):
            key = prefix + name
            if key in state_dict and state_dict[key].shape != getattr(self, name).shape:
                setattr(self, name, torch.zeros_like(state_dict[key]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def recomputes_now(self) -> bool:
        """True when the next `combine` solves for α (every ``every`` steps, from step 0)."""
        return self.steps_done % self.every == 0

    # ----------------------------------------------------------------- the method
    def task_updates(self, flat: torch.Tensor) -> torch.Tensor:
        """[M, P] Adam updates of each task's gradient row from the current moments."""
        b1, b2 = self.betas
        s = self.steps_done + 1
        bc1 = 1.0 - b1 ** s
        bc2_sqrt = (1.0 - b2 ** s) ** 0.5
        # the same operations as torch.optim.Adam (lerp / mul-addcmul) so one task is Adam
        m = self.exp_avg.to(flat).unsqueeze(0).lerp(flat, 1.0 - b1)
        v = (self.exp_avg_sq.to(flat).unsqueeze(0) * b2).addcmul(flat, flat, value=1.0 - b2)
        denom = (v.sqrt() / bc2_sqrt).add_(self.eps)
        return (m / bc1) / denom

    def solve(self, gram_u: torch.Tensor) -> torch.Tensor:
        """α from the update Gram UᵀU [M, M] (warm start: the previous α; fallback: keep it)."""
        previous = self.alpha.tolist()
        self.solves += 1
        alpha = nash_task_weights(gram_u.detach().to("cpu", torch.float64).tolist(), previous, self.normalize,
                                  self.max_iter, self.tol, self.ridge)
        self._converged = alpha is not None
        if alpha is None:
            self.failed_solves += 1
            alpha = previous
        return torch.tensor(alpha, dtype=torch.float64)

    def _combine(self, grads: Tuple[torch.Tensor, ...]) -> torch.Tensor:
        work = torch.promote_types(grads[0].dtype, torch.float32)
        flat = torch.stack([g.reshape(-1) for g in grads]).to(work)
        if self.exp_avg.numel() != flat.shape[1]:
            if self.steps_done != 0:
                raise ValueError(
                    f"pub: gradients have {flat.shape[1]} entries but the optimizer state holds "
                    f"{self.exp_avg.numel()}; the shared parameters changed"
                )
            self.reset_state(flat.shape[1], work, flat.device)
        gram_g = reduce_gram(local_gram(flat), self.process_group)
        if not bool(torch.isfinite(gram_g).all()):
            self._last.weights = None
            return plain_sum(grads)  # the trainer sees the non-finite gradient; state untouched
        self._grad_norms = norms_from_gram(gram_g).detach()
        self._cosines = cosines_from_gram(gram_g).detach()
        updates = self.task_updates(flat)
        if self.recomputes_now():
            gram_u = reduce_gram(local_gram(updates), self.process_group)
            self._update_cosines = cosines_from_gram(gram_u).detach()
            self.alpha.copy_(self.solve(gram_u).to(self.alpha))
        alpha = self.alpha.to(device=flat.device, dtype=work)
        combined = alpha @ updates
        if self.step_size == "adam":  # the norm of Adam's update of the summed gradient
            summed = self.task_updates(flat.sum(dim=0, keepdim=True))[0]
            norm = float(combined.norm())
            self._step_scale = float(summed.norm()) / norm if norm > 0 else 1.0
            alpha = alpha * self._step_scale
            combined = alpha @ updates
        g_alpha = alpha @ flat
        b1, b2 = self.betas
        self.exp_avg.lerp_(g_alpha.to(self.exp_avg), 1.0 - b1)
        self.exp_avg_sq.mul_(b2).addcmul_(g_alpha.to(self.exp_avg_sq), g_alpha.to(self.exp_avg_sq), value=1.0 - b2)
        self._last.weights = (self.alpha * self._step_scale).detach().clone()
        self._advance()
        return combined.reshape(grads[0].shape).to(grads[0].dtype)

    def extra_stats(self) -> Dict[str, Any]:
        """PUB's own numbers for the run summary (identical on every rank)."""
        return {
            "alpha": [float(a) for a in self.alpha],
            "step_scale": self._step_scale,
            "failed_solves": int(self.failed_solves),
            "solves": int(self.solves),
            "last_solve_converged": self._converged,
            "update_cosines": [[float(x) for x in row] for row in self._update_cosines],
        }


class PUBStep(ParameterLevelBalancing):
    """PUB as the optimizer step of the shared dense parameters: the same interface as
    `ParameterLevelBalancing` (per_task_gradients, apply), but `apply` writes the parameter
    update itself (the dense optimizer must leave these parameters out)."""

    owns_update = True

    def __init__(self, shared_params: Iterable[nn.Parameter], balancer: PUB, dense_lr: float,
                 weight_decay: float = 0.0) -> None:
        if not isinstance(balancer, PUB):
            raise ValueError(f"PUBStep needs the 'pub' balancer, got {type(balancer).__name__}")
        super().__init__(shared_params, balancer)
        if balancer.lr is None:
            balancer.lr = dense_lr
        self.weight_decay = weight_decay
        first = self.params[0]
        balancer.reset_state(sum(p.numel() for p in self.params), first.dtype, first.device)

    @property
    def lr(self) -> float:
        return float(self.balancer.lr)

    def apply(self, per_task: torch.Tensor) -> None:
        """``p -= lr · Σ α_t u_t`` for the shared parameters; their .grad is dropped. Weight
        decay (L2, as Adam's for the other dense parameters) is split evenly over the tasks'
        gradients, so their sum carries exactly ``weight_decay · p``."""
        if self.weight_decay:
            flat = torch.cat([p.detach().reshape(-1) for p in self.params]).to(per_task.dtype)
            per_task = per_task + (self.weight_decay / per_task.shape[0]) * flat
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

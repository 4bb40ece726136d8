"""`pub`: Parameter Update Balancing — balances the optimizer's UPDATES, not the gradients.

For the shared parameters with per-task gradients ``g_t`` (rows of ``grads``, flattened):

1. Per-task Adam updates with the CURRENT moments ``m, v`` held fixed (step ``s = step + 1``)::

       m_t = β1 m + (1-β1) g_t          v_t = β2 v + (1-β2) g_t²
       u_t = (m_t / (1-β1^s)) / (sqrt(v_t) / sqrt(1-β2^s) + eps)

   (torch.optim.Adam's bias-corrected update, written in the same order of operations.)
2. Every ``every`` steps (and at the first), weights ``α > 0`` with ``(UᵀU) α = 1/α``
   (element-wise reciprocal), U = [u_1 … u_M]. As in the reference implementation (the
   Nash-MTL code base PUB builds on), UᵀU is first divided by its Frobenius norm. The
   system is the stationarity condition of the strictly convex
   ``½ αᵀKα − Σ log α_t``, solved by `balancing.nash.nash_task_weights` (damped
   Newton, dependency-free, bounded iterations ``max_iter``) warm-started from the
   previous α. The PUB paper solves it with a short concave-convex sequence of convex
   programs (cvxpy); both target the same fixed point, which is unique because the
   objective is strictly convex when K is positive definite. If the solve does not
   converge (e.g. exactly opposite updates, where no solution exists) the previous α is
   kept and ``failed_solves`` counts it. Tasks whose update is exactly zero get α = 0 and
   are left out of the solve. Between recomputations α is reused.
3. Combined update ``Σ α_t u_t`` is returned by `combine` (not lr-scaled: the caller
   applies ``p -= lr · combined``), and the moments advance with the α-weighted gradient
   ``g_α = Σ α_t g_t``: ``m = β1 m + (1-β1) g_α``, ``v = β2 v + (1-β2) g_α²``, ``step += 1``.

With one task, α = 1 exactly and the above is Adam. State (``exp_avg``, ``exp_avg_sq``,
``step``, ``alpha``, ``failed_solves``, ``solves``) is in ``state_dict()``; the moment
buffers are sized at the first `combine` (or by `reset_state`) and resized on load.

Where it runs: the trainer (trainer/pub.py) feeds it the GLOBAL-batch per-task gradients of
the shared dense parameters (summed over ranks before it sees them, so every rank computes
the same α and update). Called directly on representation gradients [M, B, ...] (e.g. at a
plain BalancePoint) the Gram of U is all-reduced over ``process_group`` as for the other
methods, but moments over changing batch rows have no meaning there: the trainer never
does that. ``stats()``: weights = α, grad_norms / cosines of the gradients g_t (not of U).
Options: every=10, betas=(0.9, 0.999), eps=1e-8, lr=None (None: train.dense_lr),
normalize=True, max_iter=100, tol=1e-9, ridge=0.0.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from ..base import Balancer, plain_sum
from ..distributed import reduce_gram
from ..gram import cosines_from_gram, local_gram, norms_from_gram
from ..nash import nash_task_weights
from ..options import check_bool, check_float, check_int
from ..registry import register


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

    def __init__(
        self,
        num_tasks: int,
        every: int = 10,
        betas: Sequence[float] = (0.9, 0.999),
        eps: float = 1e-8,
        lr: Optional[float] = None,
        normalize: bool = True,
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
        g_alpha = alpha @ flat
        b1, b2 = self.betas
        self.exp_avg.lerp_(g_alpha.to(self.exp_avg), 1.0 - b1)
        self.exp_avg_sq.mul_(b2).addcmul_(g_alpha.to(self.exp_avg_sq), g_alpha.to(self.exp_avg_sq), value=1.0 - b2)
        self._last.weights = self.alpha.detach().clone()
        self._advance()
        return combined.reshape(grads[0].shape).to(grads[0].dtype)

    def extra_stats(self) -> Dict[str, Any]:
        """PUB's own numbers for the run summary (identical on every rank)."""
        return {
            "alpha": [float(a) for a in self.alpha],
            "failed_solves": int(self.failed_solves),
            "solves": int(self.solves),
            "last_solve_converged": self._converged,
            "update_cosines": [[float(x) for x in row] for row in self._update_cosines],
        }

"""The `Balancer` base classes: input checks, step counter, telemetry, Gram-first combine.

Every balancer maps the per-task gradients ``grads`` [M, B, ...] at the balance point to one
combined gradient [B, ...]. Dimension 1 is the (local) batch. State that changes during
training (EMAs, weights, step counter, seeds) lives in buffers/parameters, so it is in
``state_dict()``; options are plain attributes fixed at construction.

``stats()["weights"]`` convention: the effective per-task multipliers ``c`` of the combined
gradient ``sum_m c_m g_m`` (for methods whose combination is linear in the gradients, which
includes the projection methods pcgrad/gradvac whose mixing matrix collapses to column
sums), the loss multipliers for `uncertainty`, the option weights for `cograd`, and None
for `graddrop` (an element-wise random mask has no per-task multiplier).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from .distributed import reduce_gram
from .gram import cosines_from_gram, local_gram, norms_from_gram


class Balancer(nn.Module):
    """Base class of all gradient-balancing methods (see module docstring)."""

    #: registry name, set by `balancing.registry.register`
    method_name: str = ""

    def __init__(self, num_tasks: int, process_group: Optional[Any] = None) -> None:
        super().__init__()
        if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1:
            raise ValueError(f"num_tasks must be an integer >= 1, got {num_tasks!r}")
        self.num_tasks = num_tasks
        #: data-parallel group whose ranks hold the other rows of the batch (None: default group)
        self.process_group = process_group
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._weights: Optional[torch.Tensor] = None
        self._grad_norms = torch.zeros(num_tasks, dtype=torch.float64)
        self._cosines = torch.zeros(num_tasks, num_tasks, dtype=torch.float64)
        #: last reduced Gram; norms and cosines are derived from it only when stats() asks,
        #: keeping that work out of every backward pass
        self._last_gram: Optional[torch.Tensor] = None

    # ----------------------------------------------------------------- public API
    def loss(self, losses: torch.Tensor) -> torch.Tensor:
        """Scalar to call ``.backward()`` on, from the per-task losses [M]. Default: their sum."""
        return self._check_losses(losses).sum()

    def combine(self, grads: torch.Tensor) -> torch.Tensor:
        """Combined gradient [*shape] from the per-task gradients ``grads`` [M, *shape]."""
        self._check_grads(grads)
        with torch.no_grad():
            out = self._combine(grads.detach())
        return out

    def stats(self) -> Dict[str, Optional[torch.Tensor]]:
        """Last step's global-batch telemetry: ``weights`` [M] or None, ``grad_norms`` [M],
        ``cosines`` [M, M] (identical on every rank)."""
        if self._last_gram is not None:
            self._grad_norms = norms_from_gram(self._last_gram)
            self._cosines = cosines_from_gram(self._last_gram)
            self._last_gram = None
        return {
            "weights": None if self._weights is None else self._weights.clone(),
            "grad_norms": self._grad_norms.clone(),
            "cosines": self._cosines.clone(),
        }

    def extra_repr(self) -> str:
        return f"method={self.method_name!r}, num_tasks={self.num_tasks}"

    # ----------------------------------------------------------------- for subclasses
    def _combine(self, grads: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _global_gram(self, grads: torch.Tensor) -> torch.Tensor:
        """Global-batch Gram [M, M] (float64) and the telemetry derived from it."""
        gram = reduce_gram(local_gram(grads), self.process_group)
        self._last_gram = gram.detach()
        return gram

    def _advance(self) -> None:
        self.step += 1

    # ----------------------------------------------------------------- checks
    def _check_grads(self, grads: torch.Tensor) -> None:
        if not isinstance(grads, torch.Tensor):
            raise ValueError(f"grads must be a tensor [M, batch, ...], got {type(grads).__name__}")
        if grads.dim() < 2 or grads.shape[0] != self.num_tasks:
            raise ValueError(
                f"grads must have shape [M={self.num_tasks}, batch, ...] for method "
                f"{self.method_name!r}, got shape {list(grads.shape)}"
            )
        if not grads.is_floating_point():
            raise ValueError(f"grads must be a floating-point tensor, got dtype {grads.dtype}")

    def _check_losses(self, losses: torch.Tensor) -> torch.Tensor:
        if not isinstance(losses, torch.Tensor) or losses.shape != (self.num_tasks,):
            shape = list(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(
                f"losses must be a tensor of shape [M={self.num_tasks}] (one loss per task), got {shape}"
            )
        return losses


def apply_coefficients(coef: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """``sum_m coef_m * grads[m]`` computed on the LOCAL gradients (float32 at least)."""
    work = torch.promote_types(grads.dtype, torch.float32)
    flat = grads.reshape(grads.shape[0], -1).to(work)
    out = coef.to(device=grads.device, dtype=work) @ flat
    return out.reshape(grads.shape[1:]).to(grads.dtype)


class GramBalancer(Balancer):
    """Inner-product method: coefficients from the reduced Gram only, applied to LOCAL grads.

    Subclasses implement `coefficients(gram) -> Tensor[M]` (float64). All ranks see the same
    Gram, hence the same coefficients; a non-finite Gram (non-finite gradients) leaves the
    state untouched and returns the plain sum, so the trainer sees the non-finite gradient
    and can skip the step.
    """

    def coefficients(self, gram: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _combine(self, grads: torch.Tensor) -> torch.Tensor:
        gram = self._global_gram(grads)
        if not bool(torch.isfinite(gram).all()):
            self._weights = None
            return grads.sum(0)
        coef = self.coefficients(gram).detach().to(torch.float64)
        self._weights = coef
        self._advance()
        return apply_coefficients(coef, grads)

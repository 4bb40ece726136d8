"""The `Balancer` base classes: input checks, step counter, telemetry, Gram-first combine.

A balancer maps the M per-task gradients at the balance point (dimension 0 of each: the
local batch) to one combined gradient; its state is in ``state_dict()``, its options are
fixed at construction. ``stats()["weights"]`` are the effective multipliers c of
``sum_m c_m g_m`` (the loss multipliers for `uncertainty`, None for `graddrop`).
Two paths, chosen per device (`Balancer.path`): the host path (the Gram as Python floats,
see `small_linalg`) on the CPU, the device path (`coefficient_tensor`) elsewhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .distributed import reduce_gram, world_size
from .gram import (
    GRAM_DTYPE,
    GramRows,
    TaskGrad,
    TaskGrads,
    combine_stacks,
    cosines_from_gram,
    gram_of_stacks,
    gram_rows,
    norms_from_gram,
    pieces,
    task_stacks,
)
from .telemetry import LastStep

PATHS = ("auto", "host", "device")


@dataclass(frozen=True)
class TaskInfo:
    """What a data set tells a balancer about its tasks: the label names (in task order) and,
    for methods that ask for them (`Balancer.needs_label_rates`), the training label rates."""

    names: Tuple[str, ...]
    label_rates: Optional[Tuple[float, ...]] = None


class Balancer(nn.Module):
    """Base class of all gradient-balancing methods (see module docstring)."""

    #: registry name, set by `balancing.registry.register`
    method_name: str = ""
    #: True when `_combine` accepts gradients in pieces (see `combine`), using only the
    #: piece-aware helpers (`gram_rows`, `weighted_sum`, `plain_sum`) or working piece by
    #: piece; otherwise `combine` concatenates the pieces for it and splits the result.
    supports_pieces: bool = False
    #: True when the method implements `coefficient_tensor` (its combination is linear in the
    #: task gradients and its solver runs on the device); others read the Gram on the host.
    device_path: bool = False
    #: where the method can act: "representation" (in the balance point) and/or "parameters"
    #: (on the shared dense parameters' gradients, `parameter_step`)
    levels: ClassVar[Tuple[str, ...]] = ("representation", "parameters")
    #: a task side the method needs instead of the configured one (a name `models` knows)
    task_side: ClassVar[Optional[str]] = None

    def __init__(self, num_tasks: int, process_group: Optional[Any] = None) -> None:
        super().__init__()
        if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1:
            raise ValueError(f"num_tasks must be an integer >= 1, got {num_tasks!r}")
        self.num_tasks = num_tasks
        #: data-parallel group whose ranks hold the other rows of the batch (None: default group)
        self.process_group = process_group
        #: combine calls that updated the state, in `state_dict()` as ``step``; the live count
        #: is the Python int `steps_done`, written to the buffer when the state is saved.
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._steps = 0
        self._grad_norms = torch.zeros(num_tasks, dtype=torch.float64)
        self._cosines = torch.zeros(num_tasks, num_tasks, dtype=torch.float64)
        self._last = LastStep()
        self._group_ranks: Optional[int] = None
        self._path = "auto"
        self._constants: Dict[str, torch.Tensor] = {}

    @property
    def path(self) -> str:
        """"auto" (the default): the device path for gradients off the CPU, the host path on
        it; "host" or "device" force one (tests compare the two on the CPU)."""
        return self._path

    @path.setter
    def path(self, value: str) -> None:
        if value not in PATHS:
            raise ValueError(f"Balancer.path must be one of {', '.join(map(repr, PATHS))}, got {value!r}")
        self._path = value

    # ----------------------------------------------------------------- public API
    @property
    def needs_label_rates(self) -> bool:
        """True when `bind_tasks` must be given the training label rates (read from the data,
        which costs a pass over the label columns, so only methods that need them ask)."""
        return False

    @classmethod
    def parameter_step(cls, shared_params: Iterable[nn.Parameter], balancer: "Balancer", lr: float,
                       weight_decay: float) -> Any:
        """The parameter level's step for this method: the balancer on the shared dense
        parameters' per-task gradients (`ParameterLevelBalancing`; a method that computes the
        update itself, like PUB, returns its own)."""
        from .parameter_level import ParameterLevelBalancing  # it builds on this module

        return ParameterLevelBalancing(shared_params, balancer)

    def bind_tasks(self, info: TaskInfo) -> None:
        """Called once by the model builder, before training, with the data set's tasks:
        methods that name tasks or weigh them by their label priors resolve that here."""
        if len(info.names) != self.num_tasks:
            raise ValueError(f"{self.method_name}: the data set has {len(info.names)} tasks "
                             f"({', '.join(info.names)}), this balancer {self.num_tasks}")

    def loss(self, losses: torch.Tensor) -> torch.Tensor:
        """Scalar to call ``.backward()`` on, from the per-task losses [M]. Default: their sum."""
        return self._check_losses(losses).sum()

    def combine(self, grads: TaskGrads) -> TaskGrad:
        """Combined gradient [*shape] from the per-task gradients: ``grads`` [M, *shape] or a
        sequence of M tensors [*shape]. With several shared inputs, task m's gradient may
        come in pieces, ``grads[m] = (piece_1, ..., piece_P)`` (each [B, ...], the same
        shapes for every task); the result is then the tuple of combined pieces, as if the
        pieces had been flattened and concatenated, without that copy."""
        tasks = self._check_grads(grads)
        if not torch.is_grad_enabled():  # inside a backward pass: already off
            return self._dispatch(tasks)
        with torch.no_grad():
            return self._dispatch(tasks)

    def combine_in_backward(self, grads: Sequence[TaskGrad]) -> TaskGrad:
        """`combine` for `BalancePoint`'s backward: autograd has already checked the gradients
        against the forward's shapes, so only `_dispatch` runs (each check costs microseconds
        there). Under ``create_graph=True`` it falls back to `combine`, which detaches."""
        if torch.is_grad_enabled():
            return self.combine(grads)
        return self._dispatch(tuple(grads))

    def on_device(self, grads: Sequence[TaskGrad]) -> bool:
        """True when ``grads`` take the device path (see `path`)."""
        if self._path == "auto":
            return pieces(grads[0])[0].device.type != "cpu"
        return self._path == "device"

    def _dispatch(self, tasks: Tuple[TaskGrad, ...]) -> TaskGrad:
        """The device combine where it applies, else `_combine` (concatenating gradients in
        pieces for methods that need one tensor)."""
        if self.device_path and self.on_device(tasks):
            return self._combine_on_device(tasks)
        if not isinstance(tasks[0], tuple) or self.supports_pieces:
            return self._combine(tasks)
        first = tasks[0]
        batch = first[0].shape[0]
        flat = tuple(torch.cat([p.reshape(batch, -1) for p in task], dim=1) for task in tasks)
        combined = self._combine(flat)
        widths = [math.prod(p.shape[1:]) for p in first]
        return tuple(c.reshape(p.shape) for c, p in zip(combined.split(widths, dim=1), first))

    def stats(self) -> Dict[str, Optional[torch.Tensor]]:
        """Last step's global-batch telemetry: ``weights`` [M] or None, ``grad_norms`` [M],
        ``cosines`` [M, M] (identical on every rank). On the device path this is where the
        numbers are read (their copies were started in the backward pass)."""
        self._last.wait()
        if self._last.gram is not None:
            gram = torch.as_tensor(self._last.gram, dtype=GRAM_DTYPE).cpu()
            self._grad_norms = norms_from_gram(gram)
            self._cosines = cosines_from_gram(gram)
            self._last.gram = None
        weights = self._last.weights
        return {
            "weights": None if weights is None else torch.as_tensor(
                weights.tolist() if isinstance(weights, torch.Tensor) else list(weights), dtype=torch.float64
            ),
            "grad_norms": self._grad_norms.clone(),
            "cosines": self._cosines.clone(),
        }

    def run_advice(self, total_steps: int) -> Optional[str]:
        """What a user should know about this method in a run of `total_steps` steps (printed
        once at the start), or None. Methods whose behaviour depends on the run's length say so."""
        return None

    def extra_repr(self) -> str:
        return f"method={self.method_name!r}, num_tasks={self.num_tasks}"

    # ----------------------------------------------------------------- for subclasses
    def _combine(self, grads: Tuple[torch.Tensor, ...]) -> torch.Tensor:
        raise NotImplementedError

    def coefficient_tensor(self, gram: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
        """Device path of a method with ``device_path = True``: the M coefficients c of the
        combined gradient ``sum_m c_m g_m`` as a float64 tensor on the Gram's device, from the
        global-batch Gram [M, M] (float64), with tensor operations only: no host read, no
        branch on a value. State changes must be kept only where ``finite`` (a 0-d bool
        tensor) is true; the caller substitutes ones (the plain sum) where it is false."""
        raise NotImplementedError

    def reported_weights(self, coef: torch.Tensor) -> torch.Tensor:
        """``stats()["weights"]`` on the device path: the coefficients, unless the method
        reports something else (see the module docstring's convention)."""
        return coef

    def _combine_on_device(self, grads: Tuple[TaskGrad, ...]) -> TaskGrad:
        """Gram as one matrix product per piece, its all-reduce, `coefficient_tensor` and the
        combination as one matrix-vector product per piece, all on the gradients' device."""
        stacks = task_stacks(grads)
        gram = self._summed_over_ranks(gram_of_stacks(stacks))
        finite = torch.isfinite(gram).all()
        coef = torch.where(finite, self.coefficient_tensor(gram, finite), torch.ones_like(gram[0]))
        shown = torch.where(finite, self.reported_weights(coef), torch.full_like(coef, float("nan")))
        self._last.capture(gram, shown)
        self._advance()
        return combine_stacks(coef, stacks, grads[0])

    def _buffers_on(self, device: torch.device, *names: str) -> List[torch.Tensor]:
        """The named state buffers, moved to ``device`` the first time the device path meets
        them elsewhere (they then stay with the gradients, and in ``state_dict()``)."""
        out = []
        for name in names:
            buf = self._buffers[name]
            if buf.device != device:
                buf = self._buffers[name] = buf.to(device)
            out.append(buf)
        return out

    def _telemetry_gram(self, grads: Sequence[TaskGrad]) -> None:
        """The global-batch Gram, for the telemetry only (methods that do not use it): as
        `_global_gram` on the host path; on the device path it stays on the device."""
        if not self.on_device(grads):
            self._global_gram(grads)
            return
        self._last.capture(self._summed_over_ranks(gram_of_stacks(task_stacks(grads))), None)

    def _global_gram(self, grads: Sequence[TaskGrad]) -> GramRows:
        """Global-batch Gram as M rows of floats (kept for the telemetry): the local Gram, summed
        over the data-parallel ranks when there are several. A host read."""
        gram = self._reduced_gram(grads)
        self._last.gram = gram
        return gram

    def _reduced_gram(self, grads: Sequence[TaskGrad]) -> GramRows:
        """Global-batch Gram of ``grads`` as rows of floats (no telemetry)."""
        gram = gram_rows(grads)
        if self._world_size() > 1:
            local = torch.tensor(gram, dtype=GRAM_DTYPE, device=pieces(grads[0])[0].device)
            gram = self._summed_over_ranks(local).tolist()
        return gram

    def _summed_over_ranks(self, gram: torch.Tensor) -> torch.Tensor:
        """The local Gram tensor summed over the data-parallel ranks (itself on one rank)."""
        return reduce_gram(gram, self.process_group) if self._world_size() > 1 else gram

    def _constant(self, key: str, values: Sequence[Any], like: torch.Tensor,
                  dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """A constant of the method (option weights, a prior, fixed task orders) as a tensor on
        ``like``'s device, copied there once and kept (not a copy in every backward pass)."""
        dtype = like.dtype if dtype is None else dtype
        cached = self._constants.get(key)
        if cached is None or cached.device != like.device or cached.dtype != dtype:
            cached = self._constants[key] = torch.tensor(values, dtype=dtype).to(like.device)
        return cached

    def _world_size(self) -> int:
        """Ranks in the data-parallel group, looked up at the first combine and kept (this runs
        in every backward pass); the process group must be initialised by then."""
        if self._group_ranks is None:
            self._group_ranks = world_size(self.process_group)
        return self._group_ranks

    @property
    def steps_done(self) -> int:
        """Steps that updated the state so far (restored from ``step`` on load)."""
        return self._steps

    def _advance(self) -> None:
        self._steps += 1

    def _save_to_state_dict(self, destination: Dict[str, Any], prefix: str, keep_vars: bool) -> None:
        self.step.fill_(self._steps)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        if prefix + "step" in state_dict:
            self._steps = int(self.step)

    # ----------------------------------------------------------------- checks
    def _check_grads(self, grads: TaskGrads) -> Tuple[TaskGrad, ...]:
        """The M per-task gradients as a tuple (detached), after checking count, shapes and
        dtype."""
        if isinstance(grads, torch.Tensor):
            if grads.dim() < 2 or grads.shape[0] != self.num_tasks:
                raise ValueError(
                    f"grads must have shape [M={self.num_tasks}, batch, ...] for method "
                    f"{self.method_name!r}, got shape {list(grads.shape)}"
                )
            if not grads.is_floating_point():
                raise ValueError(f"grads must be floating-point, got dtype {grads.dtype}")
            return grads.detach().unbind(0)
        if not isinstance(grads, (tuple, list)) or len(grads) != self.num_tasks:
            got = len(grads) if isinstance(grads, (tuple, list)) else type(grads).__name__
            raise ValueError(
                f"grads must be a tensor [M={self.num_tasks}, batch, ...] or a sequence of M={self.num_tasks} "
                f"per-task gradients for method {self.method_name!r}, got {got}"
            )
        tasks = tuple(tuple(g) if isinstance(g, (tuple, list)) else (g,) for g in grads)
        first = tasks[0]
        if not first or not all(isinstance(p, torch.Tensor) and p.dim() >= 1 for task in tasks for p in task):
            raise ValueError("each per-task gradient must be a tensor [batch, ...] or a tuple of them")
        if any(len(task) != len(first) or any(p.shape != q.shape or p.dtype != q.dtype for p, q in zip(task, first))
               for task in tasks) or len({p.shape[0] for p in first}) != 1:
            raise ValueError(
                "per-task gradients must share their shapes [batch, ...] (one batch size) and dtype, got "
                f"{[[(list(p.shape), str(p.dtype)) for p in task] for task in tasks]}"
            )
        if not first[0].is_floating_point():
            raise ValueError(f"grads must be floating-point, got dtype {first[0].dtype}")
        detached = tuple(tuple(p.detach() if p.requires_grad else p for p in task) for task in tasks)
        return detached if isinstance(grads[0], (tuple, list)) else tuple(task[0] for task in detached)

    def _check_losses(self, losses: torch.Tensor) -> torch.Tensor:
        if not isinstance(losses, torch.Tensor) or losses.shape != (self.num_tasks,):
            shape = list(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(
                f"losses must be a tensor of shape [M={self.num_tasks}] (one loss per task), got {shape}"
            )
        return losses


def work_dtype(grads: Sequence[torch.Tensor], on_device: bool) -> torch.dtype:
    """The dtype element-wise methods compute in: float32 at least on the host; the
    gradients' own dtype on the device (each kernel computes in float32 internally, and a
    float32 copy of half-precision gradients would cost more than the method)."""
    return grads[0].dtype if on_device else torch.promote_types(grads[0].dtype, torch.float32)


def weighted_sum(coef: Sequence[float], grads: Sequence[TaskGrad], on_device: bool = False) -> TaskGrad:
    """``sum_m coef_m * grads[m]`` on the LOCAL gradients (in `work_dtype`); piece by piece
    for gradients in pieces."""
    if isinstance(grads[0], tuple):
        return tuple(weighted_sum(coef, [g[k] for g in grads], on_device) for k in range(len(grads[0])))
    work = work_dtype(grads, on_device)
    if grads[0].dtype == work and all(c == 1.0 for c in coef):
        return plain_sum(grads)  # unit weights (CoGrad's default): one pass fewer
    out = grads[0].to(work) * float(coef[0])
    for c, g in zip(coef[1:], grads[1:]):
        out.add_(g, alpha=float(c))
    return out.to(grads[0].dtype)


def plain_sum(grads: Sequence[TaskGrad]) -> TaskGrad:
    """``sum_m grads[m]`` added task by task, as autograd accumulates (a new tensor; piece
    by piece for gradients in pieces)."""
    if isinstance(grads[0], tuple):
        return tuple(plain_sum([g[k] for g in grads]) for k in range(len(grads[0])))
    out = grads[0].clone() if len(grads) == 1 else torch.add(grads[0], grads[1])
    for g in grads[2:]:
        out.add_(g)
    return out


def gram_is_finite(gram: GramRows) -> bool:
    """True when every entry of the (small) Gram matrix is finite."""
    return all(math.isfinite(x) for row in gram for x in row)


class GramBalancer(Balancer):
    """Inner-product method: coefficients from the reduced Gram only, applied to LOCAL grads.

    Subclasses implement `coefficient_values(rows) -> M floats` on the Gram as rows of Python
    floats (and `coefficient_tensor` for the device path). All ranks see the same Gram, hence
    the same coefficients; a non-finite Gram (non-finite gradients) leaves the state
    untouched and returns the plain sum, so the trainer sees the non-finite gradient and can
    skip the step.
    """

    supports_pieces = True

    def coefficient_values(self, gram: GramRows) -> List[float]:
        """The M coefficients as floats from the global-batch Gram rows."""
        raise NotImplementedError

    def _combine(self, grads: Tuple[TaskGrad, ...]) -> TaskGrad:
        gram = self._global_gram(grads)
        if not gram_is_finite(gram):
            self._last.weights = None
            return plain_sum(grads)
        coef = self.coefficient_values(gram)
        self._last.weights = coef
        self._advance()
        return weighted_sum(coef, grads)

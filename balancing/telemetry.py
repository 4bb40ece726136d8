"""What the balance point leaves behind for metrics, without reading the device in the
backward pass: the last step's Gram and weights (copied to the host without blocking on
CUDA, read when `Balancer.stats()` asks) and the time spent inside the node (CUDA events
on GPU, so it excludes waiting for earlier GPU work; the wall clock on CPU)."""
from __future__ import annotations

import time
from typing import Optional, Sequence, Union

import torch

Numbers = Union[Sequence[float], torch.Tensor]


class LastStep:
    """The last combine's ``weights`` (floats or a tensor, or None) and ``gram`` (rows of
    floats or a tensor; None once read). A plain object with slots: it is written inside
    every backward pass, where setting an nn.Module attribute costs microseconds."""

    __slots__ = ("weights", "gram", "_ready")

    def __init__(self) -> None:
        self.weights: Optional[Numbers] = None
        self.gram: Optional[Numbers] = None
        self._ready: Optional[torch.cuda.Event] = None

    def capture(self, gram: torch.Tensor, weights: Optional[torch.Tensor]) -> None:
        """Keep device tensors; on CUDA start their copies to (pinned) host memory now and
        remember an event that says when they have landed."""
        if gram.device.type == "cuda":
            gram = gram.to("cpu", non_blocking=True)
            weights = None if weights is None else weights.to("cpu", non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        self.gram, self.weights = gram, weights

    def wait(self) -> None:
        """Block until the captured copies have landed (only the node's own work, which ran
        long before the metrics are logged)."""
        if self._ready is not None:
            self._ready.synchronize()
            self._ready = None


class BackwardTiming:
    """Time of the last backward through a balance point: CUDA events around the node's
    work on GPU (elapsed GPU time, read lazily), the wall clock elsewhere."""

    __slots__ = ("_seconds", "_started", "_events", "_pending")

    def __init__(self) -> None:
        self._seconds = 0.0
        self._started = 0.0
        self._events: Optional[tuple[torch.cuda.Event, torch.cuda.Event]] = None
        self._pending = False

    def start(self, device: torch.device) -> None:
        if device.type == "cuda":
            if self._events is None:
                self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record()
            self._pending = True
        else:
            self._pending = False
            self._started = time.perf_counter()

    def stop(self) -> None:
        if self._pending and self._events is not None:
            self._events[1].record()
        else:
            self._seconds = time.perf_counter() - self._started

    @property
    def seconds(self) -> float:
        """On GPU this waits for the node's own kernels only (not for later work)."""
        if self._pending and self._events is not None:
            self._events[1].synchronize()
            self._seconds = self._events[0].elapsed_time(self._events[1]) / 1000.0
            self._pending = False
        return self._seconds

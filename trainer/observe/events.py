"""What the training loop reports, and the small interface every metrics consumer (console
progress, Prometheus exporter, history file) implements."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol


@dataclass
class StepRecord:
    """One training step as this rank saw it (steps are synchronous, so rank 0's timings
    stand for the job's)."""

    step: int
    step_seconds: float
    data_wait_seconds: float
    balance_seconds: float
    examples: int  # global examples in this step
    nonfinite: bool = False


@dataclass
class TaskProgress:
    loss: float  # global mean training loss of the last step (nats)
    ne_window: float  # training NE over the recent window (all ranks)
    ne_lifetime: float  # training NE since the start (all ranks)


@dataclass
class Progress:
    """Global (all-rank) values at a progress point; identical on every rank."""

    step: int
    total_steps: int
    elapsed_seconds: float
    eta_seconds: float
    qps: float  # window throughput, global examples/s
    qps_lifetime: float
    examples_total: int
    tasks: dict[str, TaskProgress]
    weights: list[float] | None
    grad_norms: list[float]
    cosines: list[list[float]]
    # this rank's GPU memory in bytes ({allocated, reserved, peak since the last point}); None on CPU
    gpu_memory: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Evaluation:
    step: int
    split: str
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> ne, auc, loss (, gauc)


class MetricsSink(Protocol):
    """Receives the loop's reports. Called on every rank; a sink that exports global values
    acts on rank 0 only."""

    def on_step(self, record: StepRecord) -> None: ...

    def on_progress(self, progress: Progress) -> None: ...

    def on_eval(self, evaluation: Evaluation) -> None: ...

    def on_checkpoint(self, step: int) -> None: ...

    def close(self, summary: dict[str, Any] | None) -> None: ...


class NullSink:
    """Base with no-op handlers, so sinks implement only what they use."""

    def on_step(self, record: StepRecord) -> None:
        pass

    def on_progress(self, progress: Progress) -> None:
        pass

    def on_eval(self, evaluation: Evaluation) -> None:
        pass

    def on_checkpoint(self, step: int) -> None:
        pass

    def close(self, summary: dict[str, Any] | None) -> None:
        pass

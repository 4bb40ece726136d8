"""The run's history: progress points and evaluations, kept for history.json and the
end-of-run plots."""
from __future__ import annotations

from typing import Any

from trainer.observe.events import Evaluation, NullSink, Progress


class HistorySink(NullSink):
    """Progress points and evaluations, kept for history.json and the end-of-run plots."""

    def __init__(self) -> None:
        self.points: list[dict[str, Any]] = []

    def on_progress(self, progress: Progress) -> None:
        self.points.append(progress.to_dict())

    def on_eval(self, evaluation: Evaluation) -> None:
        self.points.append({"step": evaluation.step, f"eval_{evaluation.split}": evaluation.tasks})

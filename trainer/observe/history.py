"""The run's history: progress points and evaluations, kept for history.json and the
end-of-run plots. Written with every checkpoint and read back on resume, so a resumed run's
history.json (and the summary's mean cosines) cover the whole run."""
from __future__ import annotations

import json
from pathlib import Path
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

    def restore(self, path: Path, step: int) -> str | None:
        """Start from the points of ``path`` (an earlier history.json) up to ``step``, the checkpoint
        resumed from: later ones will be produced again. Returns why nothing was taken when
        the file exists but is not a list of points (the run goes on with its own history)."""
        if not path.is_file():
            return None
        try:
            points = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            return f"{path} is not readable JSON ({err})"
        if not isinstance(points, list) or not all(isinstance(p, dict) and isinstance(p.get("step"), int)
                                                   for p in points):
            return f"{path} is not a list of points with a step"
        self.points = [p for p in points if p["step"] <= step]
        return None

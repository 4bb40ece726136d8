"""End-of-run picture for people: NE per task and the balancer's task weights over the
training steps, written as training.png next to summary.json (rank 0)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from trainer.observe.events import NullSink
from trainer.observe.history import HistorySink

PLOT_NAME = "training.png"


def _finite(values: list[float]) -> bool:
    return any(v is not None and math.isfinite(v) for v in values)


def plot_training(history: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """NE (train, recent window, solid; lifetime, dashed) per task, evaluation NE as markers,
    and a second panel of task weights when the method has weights, from the run's history
    (history.json's points). Returns the file written, or None when there is nothing to draw."""
    points = [p for p in history if "tasks" in p]
    if not points:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = list(points[0]["tasks"])
    has_weights = any(p.get("weights") is not None for p in points)
    panels = 2 if has_weights else 1
    fig = Figure(figsize=(8, 3.2 * panels), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    steps = [p["step"] for p in points]
    ax = axes[0]
    for m, task in enumerate(tasks):
        color = f"C{m}"
        ax.plot(steps, [p["tasks"][task]["ne_window"] for p in points], color=color, label=f"{task} (recent)")
        ax.plot(steps, [p["tasks"][task]["ne_lifetime"] for p in points], color=color, linestyle="--",
                linewidth=0.8, label=f"{task} (lifetime)")
        for marker, split in (("o", "valid"), ("s", "test")):
            evals = [(e["step"], e[f"eval_{split}"][task]["ne"]) for e in history
                     if task in e.get(f"eval_{split}", {})]
            if evals:
                ax.scatter(*zip(*evals), color=color, marker=marker, zorder=3, label=f"{task} ({split})")
    ax.set_ylabel("NE (lower is better)")
    ax.set_title(title or "training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    if has_weights:
        ax = axes[1]
        weighted = [p for p in points if p.get("weights") is not None]
        for m, task in enumerate(tasks):
            series = [p["weights"][m] for p in weighted]
            if _finite(series):
                ax.plot([p["step"] for p in weighted], series, color=f"C{m}", label=task)
        ax.set_ylabel("task weight")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[-1].set_xlabel("step")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


class TrainingPlot(NullSink):
    """Draws training.png at close from the run's history, which on a resumed run holds the
    earlier segments' points too (restored from history.json)."""

    def __init__(self, output_dir: Path, history: HistorySink) -> None:
        self.output_dir, self.history = Path(output_dir), history
        self.written: Path | None = None

    def close(self, summary: dict[str, Any] | None) -> None:
        if not any("tasks" in p for p in self.history.points):
            return
        title = ""
        if summary is not None:
            title = f"{summary.get('model', '')} / {summary.get('method', '')} on {summary.get('world_size', '?')} rank(s)"
        else:
            title = "training (run failed)"
        try:
            self.written = plot_training(self.history.points, self.output_dir / PLOT_NAME, title)
        except Exception as err:  # a picture must never fail a run whose results are on disk
            from trainer.observe.prometheus import warn

            warn(f"could not draw {self.output_dir / PLOT_NAME}: {err}")

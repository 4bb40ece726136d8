"""Compact progress lines for people watching a run (and for logs under torchx)."""
from __future__ import annotations

import math

from trainer.observe.events import NullSink, Progress


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class ConsoleProgress(NullSink):
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def on_progress(self, p: Progress) -> None:
        if not self.enabled:
            return
        ne = " ".join(f"{t}={v.ne_window:.4f}" for t, v in p.tasks.items())
        qps = f"{p.qps:,.0f}" if math.isfinite(p.qps) else "warming up"
        weights = ""
        if p.weights is not None:
            weights = "  w[" + " ".join(f"{w:.3f}" for w in p.weights) + "]"
        print(
            f"step {p.step}/{p.total_steps} ({100 * p.step / p.total_steps:.0f}%)  qps {qps}  NE[{ne}]{weights}  "
            f"elapsed {_duration(p.elapsed_seconds)}  eta {_duration(p.eta_seconds)}",
            flush=True,
        )

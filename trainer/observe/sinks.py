"""Observability: the Prometheus exporter (rank 0 exports the job's global figures), the
Pushgateway push of a run's final figures, and the end-of-run training.png.
See docs/observability.md."""
from __future__ import annotations

from pathlib import Path

from trainer.config import Config
from trainer.run.distributed import DistEnv
from trainer.observe.events import MetricsSink
from trainer.observe.history import HistorySink
from trainer.observe.plot import PLOT_NAME, TrainingPlot, plot_training
from trainer.observe.prometheus import DURATION_BUCKETS, PrometheusSink


def task_names(cfg: Config) -> list[str]:
    """The data set's label columns, the tasks every metric is labelled with."""
    from trainer.data.schema import Schema

    try:
        return list(Schema.load(Path(cfg.data.path) / "schema.json").labels)
    except Exception:  # the trainer reports a bad data set itself
        return []


def make_sinks(cfg: Config, env: DistEnv, output_dir: Path, history: HistorySink) -> list[MetricsSink]:
    """The sinks of this rank: training.png (drawn from the run's `history`) on rank 0; the Prometheus exporter when
    `metrics.enabled` (exporting on rank 0 only, an empty endpoint on other nodes'
    local rank 0, nothing elsewhere)."""
    sinks: list[MetricsSink] = []
    if env.is_main:
        sinks.append(TrainingPlot(output_dir, history))
    m = cfg.metrics
    if m.enabled and (env.is_main or env.local_rank == 0):
        sinks.append(PrometheusSink(
            tasks=task_names(cfg), rank=env.rank, local_rank=env.local_rank, world_size=env.world_size,
            method=cfg.balance.method, model=cfg.model.kind, level=cfg.balance.level,
            host=m.host, port=m.port, pushgateway=m.pushgateway, job=m.job, run_id=m.run_id,
        ))
    return sinks


__all__ = ["make_sinks", "PrometheusSink", "TrainingPlot", "plot_training", "PLOT_NAME", "DURATION_BUCKETS"]

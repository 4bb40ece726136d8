"""Per-task quality metrics on TorchRec's implementations: NE (the MultiBalance paper's
Eq. 13: cross-entropy normalised by the entropy of the label rate), AUC, log loss and
calibration (sum of predictions / sum of labels: 1 is calibrated; NE counts a miscalibration
that AUC does not see), reduced over all ranks when computed."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from balancing.distributed import is_distributed
from torchrec.metrics.auc import AUCMetric
from torchrec.metrics.calibration import CalibrationMetric
from torchrec.metrics.metrics_config import RecTaskInfo
from torchrec.metrics.ne import NEMetric
from torchrec.metrics.throughput import ThroughputMetric


def _task_infos(tasks: list[str]) -> list[RecTaskInfo]:
    return [RecTaskInfo(name=t, label_name=t, prediction_name=t, weight_name=t) for t in tasks]


def _by_task(values: torch.Tensor, tasks: list[str]) -> dict[str, torch.Tensor]:
    return {t: values[m] for m, t in enumerate(tasks)}


class TaskMetrics:
    """NE over the lifetime and a recent window and log loss per task; for evaluations also AUC
    (`auc_window_examples`) and calibration (`calibration`), which training progress does not
    report and so does not pay for in every step.

    `update` only touches local state; `compute` is a collective: call it on every rank."""

    def __init__(
        self, tasks: list[str], rank: int, world_size: int, local_batch_size: int,
        ne_window_examples: int, auc_window_examples: int | None = None, calibration: bool = False,
    ) -> None:
        self.tasks = tasks
        infos = _task_infos(tasks)
        common = dict(
            world_size=world_size, my_rank=rank, batch_size=local_batch_size, tasks=infos, compute_on_all_ranks=True
        )
        self.ne = NEMetric(window_size=ne_window_examples, include_logloss=True, **common)
        self.calibration = CalibrationMetric(window_size=ne_window_examples, **common) if calibration else None
        self.auc = AUCMetric(window_size=auc_window_examples, **common) if auc_window_examples else None

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> None:
        predictions = _by_task(torch.sigmoid(logits.detach().float()), self.tasks)
        label_map = _by_task(labels, self.tasks)
        weight_map = {t: weights for t in self.tasks}
        self.ne.update(predictions=predictions, labels=label_map, weights=weight_map)
        for metric in (self.calibration, self.auc):
            if metric is not None:
                metric.update(predictions=predictions, labels=label_map, weights=weight_map)

    def compute(self) -> dict[str, dict[str, float]]:
        raw = {k: float(v.reshape(-1)[0]) for k, v in self.ne.compute().items()}
        for metric in (self.calibration, self.auc):
            if metric is not None:
                raw.update({k: float(v.reshape(-1)[0]) for k, v in metric.compute().items()})
        out: dict[str, dict[str, float]] = {}
        for t in self.tasks:
            out[t] = {
                "ne": raw[f"ne-{t}|lifetime_ne"],
                "ne_window": raw[f"ne-{t}|window_ne"],
                # TorchRec reports log loss in bits; the training loss is in nats.
                "loss": raw[f"ne-{t}|lifetime_logloss"] * math.log(2),
            }
            if self.calibration is not None:
                out[t]["calibration"] = raw[f"calibration-{t}|lifetime_calibration"]
            if self.auc is not None:
                out[t]["auc"] = raw[f"auc-{t}|window_auc"]
        return out


class Throughput:
    """Global training examples per second (all ranks), after a warm-up, via TorchRec."""

    def __init__(self, local_batch_size: int, world_size: int, warmup_steps: int) -> None:
        self.metric = ThroughputMetric(
            batch_size=local_batch_size, world_size=world_size, window_seconds=10, warmup_steps=max(1, warmup_steps)
        )

    def update(self) -> None:
        self.metric.update()

    def compute(self) -> dict[str, float]:
        values = {k.split("|")[-1]: float(v) for k, v in self.metric.compute().items()}
        return {
            "qps": values.get("lifetime_throughput", float("nan")),
            "qps_window": values.get("window_throughput", float("nan")),
            "examples": values.get("total_examples", 0.0),
        }


def global_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of per-rank values (e.g. each rank's local mean loss)."""
    values = values.detach().clone()
    if is_distributed():
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def gpu_memory(device: torch.device) -> dict[str, float] | None:
    """This rank's GPU memory in bytes: allocated now, reserved by the caching allocator, and
    the peak allocated since the previous call (the peak is reset); None off CUDA."""
    if device.type != "cuda":
        return None
    out = {
        "allocated": float(torch.cuda.memory_allocated(device)),
        "reserved": float(torch.cuda.memory_reserved(device)),
        "peak": float(torch.cuda.max_memory_allocated(device)),
    }
    torch.cuda.reset_peak_memory_stats(device)
    return out

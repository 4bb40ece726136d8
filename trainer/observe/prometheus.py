"""The Prometheus exporter: a metrics sink that keeps the job's figures in its own
CollectorRegistry (never the process-global one), serves them on `/metrics`, and pushes the
run's final figures to a Pushgateway at the end.

Multi-process rule: global rank 0 exports the job's global values (the progress and
evaluation values are all-rank reductions, identical on every rank; the step histograms are
rank 0's own timings, which stand for the job's because steps are synchronous). Every other
rank exports nothing, so a scrape never double-counts. The local-rank-0 process of every
other node serves an EMPTY `/metrics` on the same port, so that a per-pod scrape target
(PodMonitor) stays up without contributing series; every other process opens no port.
"""
from __future__ import annotations

import math
import os
import sys
import threading
import time
import uuid
from typing import Any, Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, push_to_gateway
from prometheus_client.registry import Collector
from prometheus_client.exposition import start_http_server

from trainer.observe.events import Evaluation, NullSink, Progress, StepRecord

PREFIX = "recbalance"
#: Buckets for step, data-wait and balance-point durations: 100 µs .. 10 s on a 1-2.5-5
#: grid (step times of 1 ms .. 10 s are resolved to a factor of 2-2.5; the balance point
#: and a data wait are often well under a millisecond).
DURATION_BUCKETS = (
    0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05,
    0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)
INFO_LABELS = ("method", "model", "world_size", "version", "level", "run_id")


def recbalance_version() -> str:
    try:
        from importlib.metadata import version

        return version("recbalance")
    except Exception:  # a bare checkout that was never installed
        return "unknown"


def generate_run_id() -> str:
    """The launcher's run id when there is one (torchrun / torchx: the job's rendezvous
    id), else the start time with a random suffix."""
    launcher = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if launcher and launcher != "none":
        return launcher
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def warn(message: str) -> None:
    print(f"recbalance: warning: {message}", file=sys.stderr, flush=True)


class _TimedCollector(Collector):
    """Serves another registry: takes a snapshot under the sink's lock (so a scrape never
    sees half of a progress point) and adds the time each scrape took (snapshot and text
    formatting, which run in the server thread and so compete with training) to a counter."""

    def __init__(self, inner: CollectorRegistry, lock: threading.Lock, seconds: Counter, scrapes: Counter) -> None:
        self.inner, self.lock, self.seconds, self.scrapes = inner, lock, seconds, scrapes

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        started = time.perf_counter()
        try:
            with self.lock:
                families = list(self.inner.collect())
            yield from families
        finally:
            self.seconds.inc(time.perf_counter() - started)
            self.scrapes.inc()


class PrometheusSink(NullSink):
    """Exports the loop's reports as Prometheus metrics (see docs/observability.md).

    `exporting` is True on global rank 0 only; on other ranks every handler returns at
    once and the registry holds no recbalance series. `serve=False` builds the registry
    without an HTTP server (tests, and reading values back in-process)."""

    def __init__(
        self,
        *,
        tasks: list[str],
        rank: int,
        local_rank: int,
        world_size: int,
        method: str,
        model: str,
        level: str,
        host: str = "127.0.0.1",
        port: int = 9400,
        pushgateway: str = "",
        job: str = PREFIX,
        run_id: str = "",
        serve: bool = True,
        announce: bool = True,
    ) -> None:
        self.tasks = list(tasks)
        self.exporting = rank == 0
        self.pushgateway, self.job = pushgateway, job
        self.run_id = run_id or (generate_run_id() if self.exporting else "")
        self.info_labels = {
            "method": method, "model": model, "world_size": str(world_size), "version": recbalance_version(),
            "level": level, "run_id": self.run_id,
        }
        self.registry = CollectorRegistry(auto_describe=False)
        self.lock = threading.Lock()
        self.last_progress: Progress | None = None
        self.evaluations: dict[str, Evaluation] = {}
        self.checkpoint_step: int | None = None
        self.counts = {"examples": 0, "steps": 0, "nonfinite": 0}  # for the push after a failure
        self.closed = False
        if self.exporting:
            self._define(self.registry)
        self.server = None
        self.thread = None
        self.port: int | None = None
        serve_empty = not self.exporting and local_rank == 0
        if serve and (self.exporting or serve_empty):
            self._serve(host, port, announce=announce and self.exporting)

    # -- metric definitions ----------------------------------------------------------------
    def _define(self, r: CollectorRegistry) -> None:
        p = PREFIX
        self.info = Gauge(f"{p}_info", "Run description; always 1.", INFO_LABELS, registry=r)
        self.info.labels(**self.info_labels).set(1)
        self.examples = Counter(f"{p}_train_examples", "Training examples processed, all ranks.", registry=r)
        self.steps = Counter(f"{p}_train_steps", "Training steps completed by this process.", registry=r)
        self.step = Gauge(f"{p}_train_step", "The run's current step (counts steps before a resume too).", registry=r)
        self.planned_steps = Gauge(f"{p}_train_planned_steps", "Steps the run will take in total.", registry=r)
        self.eta = Gauge(f"{p}_train_eta_seconds", "Estimated time to the end of training.", registry=r)
        self.qps = Gauge(f"{p}_qps", "Training throughput over the recent window, examples/s, all ranks.", registry=r)
        self.qps_lifetime = Gauge(
            f"{p}_qps_lifetime", "Training throughput since warm-up ended, examples/s, all ranks.", registry=r
        )
        self.ne = Gauge(
            f"{p}_task_ne",
            "Normalized entropy per task (cross-entropy / entropy of the label rate); lower is better. "
            "window=recent: the last train.log_every steps; lifetime: since the start (train) or the whole split (eval).",
            ["task", "split", "window"], registry=r,
        )
        self.auc = Gauge(f"{p}_task_auc", "ROC AUC per task on an evaluation split.", ["task", "split"], registry=r)
        self.gauc = Gauge(
            f"{p}_task_gauc", "Group (per-user) AUC per task on an evaluation split, when the data set has users.",
            ["task", "split"], registry=r,
        )
        self.calibration = Gauge(
            f"{p}_task_calibration", "Sum of predictions / sum of labels per task on an evaluation split; 1 is calibrated.",
            ["task", "split"], registry=r,
        )
        self.loss = Gauge(f"{p}_task_loss", "Training log loss per task (nats), last step, all ranks.", ["task"], registry=r)
        self.weight = Gauge(f"{p}_task_weight", "Balancer's effective weight per task.", ["task"], registry=r)
        self.grad_norm = Gauge(
            f"{p}_task_grad_norm", "Norm of each task's gradient at the balance point.", ["task"], registry=r
        )
        self.cosine = Gauge(
            f"{p}_task_grad_cosine", "Cosine between two tasks' gradients at the balance point (task_a before task_b).",
            ["task_a", "task_b"], registry=r,
        )
        self.gpu_memory = Gauge(
            f"{p}_gpu_memory_bytes", "Rank 0's GPU memory: allocated, reserved (caching allocator), peak "
            "allocated since the previous progress point. Absent on CPU.", ["kind"], registry=r,
        )
        self.eval_step = Gauge(f"{p}_eval_step", "Training step of the latest evaluation.", ["split"], registry=r)
        self.step_seconds = Histogram(
            f"{p}_step_seconds", "Wall time of one training step (rank 0; steps are synchronous).",
            buckets=DURATION_BUCKETS, registry=r,
        )
        self.data_wait = Histogram(
            f"{p}_data_wait_seconds", "Time a step waited for its batch (rank 0).", buckets=DURATION_BUCKETS, registry=r
        )
        self.balance = Histogram(
            f"{p}_balance_seconds", "Time inside the balance point in one step (rank 0).",
            buckets=DURATION_BUCKETS, registry=r,
        )
        self.nonfinite = Counter(f"{p}_nonfinite_steps", "Steps with a non-finite loss or gradient.", registry=r)
        self.checkpoint = Gauge(f"{p}_last_checkpoint_step", "Step of the newest complete checkpoint.", registry=r)
        self.update_seconds = Counter(
            f"{p}_exporter_update_seconds", "Time the training loop spent updating these metrics.", registry=r
        )
        self.scrape_seconds = Counter(
            f"{p}_exporter_scrape_seconds", "Time spent collecting and formatting scrapes of /metrics.", registry=r
        )
        self.scrapes = Counter(f"{p}_exporter_scrapes", "Scrapes of /metrics served.", registry=r)
        # No figure yet is "unknown", not 0 (a 0 QPS would fire the QPS-regression alert).
        for gauge in (self.qps, self.qps_lifetime, self.eta, self.checkpoint, self.planned_steps):
            gauge.set(math.nan)

    def _serve(self, host: str, port: int, announce: bool) -> None:
        served = self.registry
        if self.exporting:
            served = CollectorRegistry(auto_describe=False)
            served.register(_TimedCollector(self.registry, self.lock, self.scrape_seconds, self.scrapes))
        try:
            self.server, self.thread = start_http_server(port, addr=host, registry=served)
        except OSError as err:
            warn(f"metrics exporter not started: cannot listen on {host}:{port} ({err}); "
                 "set metrics.port to a free port, 0 for any free port, or metrics.enabled=false")
            return
        self.port = int(self.server.server_port)
        if announce:
            shown = f"[{host}]" if ":" in host else host
            print(f"metrics: http://{shown}:{self.port}/metrics  (run_id {self.run_id})", flush=True)

    # -- sink handlers -----------------------------------------------------------------------
    def _timed(self, update: Callable[[Any], None], event: Any) -> None:
        """Apply ``update(event)`` under the lock, its time counted in the exporter's own cost."""
        if not self.exporting:
            return
        started = time.perf_counter()
        with self.lock:
            update(event)
        self.update_seconds.inc(time.perf_counter() - started)

    def on_step(self, record: StepRecord) -> None:
        self._timed(self._step, record)

    def _step(self, record: StepRecord) -> None:
        self.counts["examples"] += record.examples
        self.counts["steps"] += 1
        self.examples.inc(record.examples)
        self.steps.inc()
        self.step.set(record.step)
        self.step_seconds.observe(record.step_seconds)
        self.data_wait.observe(record.data_wait_seconds)
        self.balance.observe(record.balance_seconds)
        if record.nonfinite:
            self.counts["nonfinite"] += 1
            self.nonfinite.inc()

    def on_progress(self, progress: Progress) -> None:
        self._timed(self._progress, progress)

    def _progress(self, progress: Progress) -> None:
        self.last_progress = progress
        self.planned_steps.set(progress.total_steps)
        self.eta.set(progress.eta_seconds)
        self.qps.set(progress.qps)
        self.qps_lifetime.set(progress.qps_lifetime)
        for task, values in progress.tasks.items():
            self.ne.labels(task, "train", "recent").set(values.ne_window)
            self.ne.labels(task, "train", "lifetime").set(values.ne_lifetime)
            self.loss.labels(task).set(values.loss)
        names = list(progress.tasks) or self.tasks
        if progress.weights is not None:
            for task, w in zip(names, progress.weights):
                self.weight.labels(task).set(w)
        for task, norm in zip(names, progress.grad_norms):
            self.grad_norm.labels(task).set(norm)
        for a, row in enumerate(progress.cosines):
            for b in range(a + 1, min(len(row), len(names))):
                self.cosine.labels(names[a], names[b]).set(row[b])
        for kind, value in (progress.gpu_memory or {}).items():
            self.gpu_memory.labels(kind).set(value)

    def on_eval(self, evaluation: Evaluation) -> None:
        self._timed(self._evaluation, evaluation)

    def _evaluation(self, evaluation: Evaluation) -> None:
        self.evaluations[evaluation.split] = evaluation
        self.eval_step.labels(evaluation.split).set(evaluation.step)
        for task, values in evaluation.tasks.items():
            if "ne" in values:
                self.ne.labels(task, evaluation.split, "lifetime").set(values["ne"])
            if "auc" in values:
                self.auc.labels(task, evaluation.split).set(values["auc"])
            if "gauc" in values:
                self.gauc.labels(task, evaluation.split).set(values["gauc"])
            if "calibration" in values:
                self.calibration.labels(task, evaluation.split).set(values["calibration"])

    def on_checkpoint(self, step: int) -> None:
        if not self.exporting:
            return
        with self.lock:
            self.checkpoint_step = step
            self.checkpoint.set(step)

    def close(self, summary: dict[str, Any] | None) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if self.exporting and self.pushgateway:
                self.push(summary)
        finally:
            self.stop_server()

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    # -- Pushgateway ---------------------------------------------------------------------------
    def final_registry(self, summary: dict[str, Any] | None) -> CollectorRegistry:
        """The run's final figures, for the Pushgateway: from summary.json when the run
        completed, else the latest live values."""
        r = CollectorRegistry(auto_describe=False)
        p = PREFIX
        Gauge(f"{p}_info", "Run description; always 1.", INFO_LABELS, registry=r).labels(**self.info_labels).set(1)
        Gauge(f"{p}_run_completed", "1 when the run finished and wrote summary.json, 0 when it failed.",
              registry=r).set(1 if summary is not None else 0)
        progress = self.last_progress
        qps = Gauge(f"{p}_qps", "The run's training throughput, examples/s, all ranks (summary.json's qps).", registry=r)
        examples = Counter(f"{p}_train_examples", "Training examples processed, all ranks.", registry=r)
        steps = Counter(f"{p}_train_steps", "Training steps completed.", registry=r)
        ne = Gauge(f"{p}_task_ne", "Normalized entropy per task.", ["task", "split", "window"], registry=r)
        auc = Gauge(f"{p}_task_auc", "ROC AUC per task on an evaluation split.", ["task", "split"], registry=r)
        weight = Gauge(f"{p}_task_weight", "Balancer's final weight per task.", ["task"], registry=r)
        calibration = Gauge(f"{p}_task_calibration", "Sum of predictions / sum of labels per task on an evaluation "
                            "split; 1 is calibrated.", ["task", "split"], registry=r)

        def set_evaluation(split: str, tasks: dict[str, dict[str, float]]) -> None:
            for task, values in tasks.items():
                ne.labels(task, split, "lifetime").set(values["ne"])
                auc.labels(task, split).set(values["auc"])
                if "calibration" in values:
                    calibration.labels(task, split).set(values["calibration"])

        nonfinite = Counter(f"{p}_nonfinite_steps", "Steps with a non-finite loss or gradient.", registry=r)
        nonfinite.inc(self.counts["nonfinite"])
        if self.checkpoint_step is not None:
            Gauge(f"{p}_last_checkpoint_step", "Step of the newest complete checkpoint.", registry=r).set(
                self.checkpoint_step)
        if summary is not None:
            qps.set(summary.get("qps", math.nan))
            examples.inc(summary.get("examples_seen", 0))
            steps.inc(summary.get("steps", 0))
            Gauge(f"{p}_train_seconds", "Wall time of the training loop.", registry=r).set(
                summary.get("train_seconds", math.nan))
            set_evaluation(summary.get("eval_split", "test"), summary.get("tasks") or {})
            for task, w in (summary.get("weights") or {}).items():
                weight.labels(task).set(w)
        else:
            qps.set(progress.qps_lifetime if progress else math.nan)
            examples.inc(self.counts["examples"])
            steps.inc(self.counts["steps"])
            if progress is not None and progress.weights is not None:
                for task, w in zip(progress.tasks, progress.weights):
                    weight.labels(task).set(w)
        # Every evaluation seen (e.g. the last validation), besides the final one above.
        for split, evaluation in self.evaluations.items():
            if summary is not None and split == summary.get("eval_split"):
                continue
            set_evaluation(split, evaluation.tasks)
        if progress is not None:
            for task, values in progress.tasks.items():
                ne.labels(task, "train", "recent").set(values.ne_window)
                ne.labels(task, "train", "lifetime").set(values.ne_lifetime)
        return r

    def push(self, summary: dict[str, Any] | None) -> bool:
        """Push the final figures grouped by job and run id; a failure is a warning only."""
        try:
            push_to_gateway(self.pushgateway, job=self.job, registry=self.final_registry(summary),
                            grouping_key={"run_id": self.run_id}, timeout=10)
        except Exception as err:  # the run's results are on disk; never fail it for this
            warn(f"could not push the final metrics to the Pushgateway {self.pushgateway}: {err}")
            return False
        return True


def baseline_registry(summary: dict[str, Any], qps: float | None = None) -> tuple[CollectorRegistry, dict[str, str]]:
    """`recbalance_qps_baseline` from a run's summary.json, and the grouping labels
    (method, model, level, world_size) it is pushed under."""
    labels = {
        "method": str(summary["method"]), "model": str(summary["model"]),
        "level": str(summary.get("level", "representation")), "world_size": str(summary["world_size"]),
    }
    r = CollectorRegistry(auto_describe=False)
    Gauge(f"{PREFIX}_qps_baseline", "Baseline training QPS (examples/s) for a method, model, level and world size.",
          registry=r).set(float(summary["qps"] if qps is None else qps))
    return r, labels


def push_baseline(gateway: str, summary: dict[str, Any], job: str = "recbalance-baseline",
                  qps: float | None = None) -> dict[str, str]:
    registry, labels = baseline_registry(summary, qps)
    push_to_gateway(gateway, job=job, registry=registry, grouping_key=labels, timeout=10)
    return labels

"""The training service's core: one object owning the sharded model, optimizers, data
stream and metrics, stepping with ONE backward per step and evaluating on all ranks."""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from balancing import Balancer
from trainer.core.factory import balance_level, build
from trainer.core.checkpoint import CheckpointManager, CheckpointMismatchError
from trainer.core.guard import NonFiniteGuard, NonFiniteLimitError
from trainer.config import Config, ConfigError
from trainer.data.batch import Batch
from trainer.data.reader import ParquetReader
from trainer.data.stream import TrainStream
from trainer.data.schema import Schema
from balancing.distributed import all_reduce_sum, is_distributed
from trainer.run.distributed import DistEnv
from trainer.observe.gauc import UserGAUC
from trainer.observe.events import Evaluation, MetricsSink, Progress, StepRecord, TaskProgress
from trainer.observe.history import HistorySink
from trainer.observe.metrics import TaskMetrics, Throughput, global_mean, gpu_memory
from trainer.observe.progress import ConsoleProgress
from trainer.observe.report import write_json
from trainer.core.parallel import make_optimizer, shard_model, sharding_plan_summary

log = logging.getLogger("recbalance")


def local_batch_size(global_batch: int, world_size: int, key: str) -> int:
    if global_batch % world_size:
        raise ConfigError(
            f"config key '{key}': {global_batch} is not divisible by the world size {world_size}"
        )
    return global_batch // world_size


def task_losses(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Per-task mean BCE over the LOCAL batch slots [M]. Weight-0 rows (padding, skipped bad
    rows) count in the denominator, so every rank's rows are rows of the global batch."""
    bce = F.binary_cross_entropy_with_logits(logits, batch.labels, reduction="none")
    return (bce * batch.weights).sum(dim=1) / logits.shape[1]


@dataclass
class StepResult:
    losses: torch.Tensor  # [M] local mean losses
    balance_seconds: float
    nonfinite: bool = False


STOP_CHECK_EVERY = 10  # steps between the all-rank checks for a pending SIGTERM


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint was saved and the run stops to be resumed later."""


class Trainer:
    """Builds everything from the config on every rank and runs the train/eval loop."""

    def __init__(self, cfg: Config, env: DistEnv, output_dir: Path, sinks: list[MetricsSink] | None = None) -> None:
        self.cfg, self.env, self.output_dir = cfg, env, output_dir
        root = Path(cfg.data.path)
        self.schema = Schema.load(root / "schema.json")
        self.tasks = list(self.schema.labels)
        torch.manual_seed(cfg.train.seed)
        built = build(cfg, self.schema)
        self.balancer: Balancer = built.balancer  # the configured method, whichever level it acts at
        self.param_level = built.parameter_level
        self.model = shard_model(
            built.model, env, cfg.sharding.type, cfg.train.embedding_optimizer, cfg.train.embedding_lr
        )
        owned = self.param_level.params if self.param_level is not None and self.param_level.owns_update else ()
        self.optimizer = make_optimizer(self.model, cfg.train.dense_lr, cfg.train.weight_decay, exclude=owned)
        self.dense_params = [p for _, p in in_backward_optimizer_filter(self.model.named_parameters())]
        self.guard = NonFiniteGuard(self.ranker.sparse_arch)
        self.local_batch = local_batch_size(cfg.data.global_batch_size, env.world_size, "data.global_batch_size")
        self.eval_local_batch = local_batch_size(cfg.data.eval_batch_size, env.world_size, "data.eval_batch_size")
        self.train_reader = self._reader("train", self.local_batch, shuffle=cfg.data.shuffle, drop_last=True)
        self.stream = TrainStream(self.train_reader)
        per_epoch = self.train_reader.batches_per_epoch
        self.total_steps = cfg.train.steps or max(1, math.ceil(cfg.train.epochs * per_epoch))
        self.step = 0
        self.examples_seen = 0
        self.nonfinite_total = 0
        self.nonfinite_in_row = 0
        self.stop_requested = False  # set by the SIGTERM handler
        self.last_saved: tuple[int, Path] | None = None  # (step, path) of the checkpoint this run wrote last
        self.train_seconds = 0.0
        self.train_metrics = TaskMetrics(
            self.tasks, env.rank, env.world_size, self.local_batch,
            ne_window_examples=self.local_batch * max(1, cfg.train.log_every),
        )
        self.throughput = Throughput(self.local_batch, env.world_size, warmup_steps=min(20, self.total_steps // 10))
        self.history = HistorySink()
        self.sinks: list[MetricsSink] = [ConsoleProgress(env.is_main), self.history, *(sinks or [])]
        self.checkpoints = CheckpointManager(
            Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else output_dir / "checkpoints", cfg.checkpoint.keep
        )
        self.resumed_from: int | None = None
        self.eval_skipped_rows: dict[str, int] = {}  # split -> bad rows its last evaluation skipped
        self.resume()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs. Per-rank metric states live under per-rank keys
        (torch.distributed.checkpoint treats identical keys as replicated). A balancer at the
        parameter level is not in the model: its state has its own key."""
        stream = self.stream.state_dict()
        balancer = {"balancer": self.balancer.state_dict()} if self.param_level is not None else {}
        return {
            **balancer,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "progress": {
                "step": torch.tensor(self.step), "examples_seen": torch.tensor(self.examples_seen),
                "nonfinite_total": torch.tensor(self.nonfinite_total),
                "epoch": torch.tensor(stream["epoch"]), "batch": torch.tensor(stream["batch"]),
            },
            f"rank{self.env.rank}": {"train_ne": self.train_metrics.ne.state_dict()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if self.param_level is not None:
            self.balancer.load_state_dict(state["balancer"])
        self.optimizer.load_state_dict(state["optimizer"])
        progress = {k: int(v) for k, v in state["progress"].items()}
        self.step, self.examples_seen = progress["step"], progress["examples_seen"]
        self.nonfinite_total = progress["nonfinite_total"]
        self.stream.load_state_dict({"epoch": progress["epoch"], "batch": progress["batch"]})
        self.train_metrics.ne.load_state_dict(state[f"rank{self.env.rank}"]["train_ne"])

    def resume(self) -> None:
        """Continue from the newest checkpoint; with `checkpoint.resume = false` (--fresh),
        move the existing ones aside and start at step 0. A checkpoint that does not fit the
        config, or whose step is beyond this config's last one, stops the run untouched."""
        if not self.cfg.checkpoint.resume:
            moved = self.checkpoints.set_aside_all()
            if moved and self.env.is_main:
                print(f"recbalance: starting at step 0 (checkpoint.resume = false); the existing checkpoints "
                      f"were moved to {moved}", flush=True)
            return
        if not self.checkpoints.complete_checkpoints():
            return
        # Adam's state is created lazily; make it exist so the checkpoint loads in place.
        for _, optimizer in self.optimizer.optimizers:
            if isinstance(optimizer, KeyedOptimizerWrapper):
                optimizer.init_state()
        for p in self.dense_params:
            p.grad = None  # DDP re-creates its bucket views on the next backward
        state = self.state_dict()
        step = self.checkpoints.load_latest(state)
        if step is None:
            return
        self.load_state_dict(state)
        self.resumed_from = step
        path = self.checkpoints.directory / f"step-{step:09d}"
        if self.step > self.total_steps:
            raise CheckpointMismatchError(
                f"checkpoint {path} is at step {self.step}, beyond the {self.total_steps} steps this config trains "
                f"(train.steps = {self.cfg.train.steps}, train.epochs = {self.cfg.train.epochs:g}): the run in "
                f"{self.output_dir} was trained further than asked, and its files are left as they are. To train "
                f"{self.total_steps} steps, use a new --output-dir or --fresh; to see that run, read its summary.json."
            )
        if self.env.is_main:
            print(f"resumed from {path} (step {self.step}, {self.examples_seen} examples seen)", flush=True)
            problem = self.history.restore(self.output_dir / "history.json", step)
            if problem:
                print(f"recbalance: warning: {problem}; history.json starts again at step {step}", flush=True)

    def finished_summary(self) -> dict[str, Any] | None:
        """Collective: when the run resumed at its last step and rank 0 finds its summary.json,
        that summary (on rank 0; an empty dict elsewhere), the files left untouched; else None."""
        path = self.output_dir / "summary.json"
        done = self.resumed_from is not None and self.step >= self.total_steps and self.env.is_main and path.is_file()
        if not all_reduce_sum(torch.tensor([int(done)]))[0]:
            return None
        if not self.env.is_main:
            return {}
        print(f"recbalance: the run in {self.output_dir} is complete (step {self.step} of {self.total_steps}); "
              "nothing was trained, and its summary.json and history.json are left as they are", flush=True)
        return json.loads(path.read_text())

    def save_checkpoint(self) -> Path:
        """Collective. A step already saved is not written again: SIGTERM or the end of the
        run right after a periodic save would otherwise replace a good checkpoint with the
        same state, leaving a window in which none exists."""
        if self.last_saved is not None and self.last_saved[0] == self.step:
            return self.last_saved[1]
        path = self.checkpoints.save(self.step, self.state_dict())
        self.last_saved = (self.step, path)
        if self.env.is_main:  # the history so far, so that a resumed run can continue it
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.output_dir / "history.json", self.history.points, indent=1)
        for sink in self.sinks:
            sink.on_checkpoint(self.step)
        return path

    def _stop_pending(self) -> bool:
        """Collective every STOP_CHECK_EVERY steps: did any rank receive SIGTERM?"""
        if self.step % STOP_CHECK_EVERY:
            return False
        flag = torch.tensor([1.0 if self.stop_requested else 0.0])
        if is_distributed():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag[0])

    @property
    def ranker(self) -> Any:
        """The unwrapped model (sharded tables, no DDP wrapper)."""
        return self.model.module

    def _reader(self, split: str, batch: int, shuffle: bool, drop_last: bool) -> ParquetReader:
        return ParquetReader(
            Path(self.cfg.data.path), self.schema, split, batch, self.env.rank, self.env.world_size,
            shuffle=shuffle, seed=self.cfg.train.seed, drop_last=drop_last, prefetch=self.cfg.data.prefetch,
            id_policy=self.cfg.data.id_policy, bad_rows=self.cfg.data.bad_rows,
            pin_memory=self.env.device.type == "cuda",
        )

    def train_step(self, batch: Batch) -> StepResult:
        """Forward, ONE ordinary backward (the balance point combines the task gradients in
        it), fused sparse + dense optimizer step."""
        self.model.train()
        self.guard.begin_step()
        logits = self.model(batch.dense, batch.sparse)
        losses = task_losses(logits, batch)
        objective = self.balancer.loss(losses) / self.env.world_size
        self.optimizer.zero_grad()
        # At the parameter level the per-task passes come AFTER the ordinary backward: before
        # it they would fire DDP's reducer hooks and leave part of the dense gradients unreduced.
        objective.backward(retain_graph=self.param_level is not None)
        param_seconds = 0.0
        if self.param_level is not None:
            started = time.perf_counter()
            self.param_level.apply(self.param_level.per_task_gradients(losses, objective))
            param_seconds = time.perf_counter() - started
        finite = self.guard.step_is_finite(self.dense_params)  # the step's one host read
        # read after it: on GPU the node's CUDA events have completed by then
        balance_seconds = param_seconds if self.param_level else self.ranker.balance_point.last_balance_seconds
        if not finite:
            self.optimizer.zero_grad()  # skip: the embeddings received a zero gradient
            return StepResult(losses=losses.detach(), balance_seconds=balance_seconds, nonfinite=True)
        self.optimizer.step()
        self.train_metrics.update(logits, batch.labels, batch.weights)
        return StepResult(losses=losses.detach(), balance_seconds=balance_seconds)

    def fit(self, until_step: int | None = None) -> None:
        """Train to `total_steps` (or `until_step`), checkpointing every `checkpoint.every`
        steps and when SIGTERM arrives."""
        started = time.perf_counter()
        log_every = self.cfg.train.log_every
        every = self.cfg.checkpoint.every
        last = min(self.total_steps, until_step or self.total_steps)
        while self.step < last:
            step_started = time.perf_counter()
            batch = next(self.stream).to(self.env.device, non_blocking=True)
            data_wait = time.perf_counter() - step_started
            result = self.train_step(batch)
            self.step += 1
            self.examples_seen += self.cfg.data.global_batch_size
            self.throughput.update()
            record = StepRecord(
                step=self.step, step_seconds=time.perf_counter() - step_started, data_wait_seconds=data_wait,
                balance_seconds=result.balance_seconds, examples=self.cfg.data.global_batch_size,
                nonfinite=result.nonfinite,
            )
            self._count_nonfinite(result)
            for sink in self.sinks:
                sink.on_step(record)
            if self.step % log_every == 0 or self.step == self.total_steps:
                self._report_progress(result, started)
            if self.cfg.train.eval_every and self.step % self.cfg.train.eval_every == 0:
                self._report_eval(self.evaluate("valid"), "valid")
            if every and self.step % every == 0:
                self.save_checkpoint()
            if self._stop_pending():
                path = self.save_checkpoint()
                raise Preempted(f"SIGTERM: saved {path} at step {self.step}; rerun the same command to resume")
        self.train_seconds += time.perf_counter() - started

    def _count_nonfinite(self, result: StepResult) -> None:
        if not result.nonfinite:
            self.nonfinite_in_row = 0
            return
        self.nonfinite_total += 1
        self.nonfinite_in_row += 1
        if self.env.is_main:
            print(f"step {self.step}: non-finite loss or gradient, step skipped "
                  f"({self.nonfinite_in_row} in a row, {self.nonfinite_total} in total)", flush=True)
        if self.nonfinite_in_row >= self.cfg.train.max_nonfinite_in_row:
            path = self.save_checkpoint()
            raise NonFiniteLimitError(
                f"{self.nonfinite_in_row} non-finite steps in a row (train.max_nonfinite_in_row = "
                f"{self.cfg.train.max_nonfinite_in_row}); saved {path} at step {self.step} and stopped. "
                "Lower train.dense_lr / train.embedding_lr or check the data for extreme values."
            )

    def _report_progress(self, result: StepResult, started: float) -> None:
        """Collective (metrics all-reduce): every rank calls it at the same steps."""
        losses = global_mean(result.losses)
        train = self.train_metrics.compute()
        speed = self.throughput.compute()
        elapsed = time.perf_counter() - started
        stats = self.balancer.stats()
        weights = stats.get("weights")
        progress = Progress(
            step=self.step,
            total_steps=self.total_steps,
            elapsed_seconds=elapsed,
            eta_seconds=elapsed / self.step * (self.total_steps - self.step),
            qps=speed["qps_window"],
            qps_lifetime=speed["qps"],
            examples_total=self.examples_seen,
            tasks={
                t: TaskProgress(loss=float(losses[m]), ne_window=train[t]["ne_window"], ne_lifetime=train[t]["ne"])
                for m, t in enumerate(self.tasks)
            },
            weights=None if weights is None else [float(w) for w in weights],
            grad_norms=[float(x) for x in stats["grad_norms"]],
            cosines=[[float(x) for x in row] for row in stats["cosines"]],
            gpu_memory=gpu_memory(self.env.device),
        )
        for sink in self.sinks:
            sink.on_progress(progress)

    def _report_eval(self, results: dict[str, dict[str, float]], split: str) -> None:
        evaluation = Evaluation(step=self.step, split=split, tasks=results)
        for sink in self.sinks:
            sink.on_eval(evaluation)

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, dict[str, float]]:
        """NE, AUC and loss per task (and GAUC by user when the schema names a user id) over
        every row of `split`, all ranks together; bad rows it skipped are counted."""
        reader = self._reader(split, self.eval_local_batch, shuffle=False, drop_last=False)
        rows = reader.batches_per_epoch * self.cfg.data.eval_batch_size
        metrics = TaskMetrics(
            self.tasks, self.env.rank, self.env.world_size, self.eval_local_batch,
            ne_window_examples=rows, auc_window_examples=rows, calibration=True,
        )
        gauc = UserGAUC(self.tasks, self.env.rank, self.env.world_size) if self.schema.user_id else None
        self.model.eval()
        for batch in reader.epoch(0):
            batch = batch.to(self.env.device, non_blocking=True)
            logits = self.model(batch.dense, batch.sparse)
            metrics.update(logits, batch.labels, batch.weights)
            if gauc is not None:
                gauc.update(batch.user_ids, torch.sigmoid(logits), batch.labels, batch.weights)
        results = metrics.compute()
        self.eval_skipped_rows[split] = int(all_reduce_sum(torch.tensor([reader.skipped_rows]))[0])
        if gauc is not None:
            for task, value in gauc.compute().items():
                results[task]["gauc"] = value
        return results

    def summary(self, evaluation: dict[str, dict[str, float]]) -> dict[str, Any]:
        """summary.json's content. Numbers that are not finite become null when written;
        `qps_note` then says why the QPS is missing."""
        speed = self.throughput.compute()
        stats = self.balancer.stats()
        weights = stats.get("weights")
        trained = self.step - (self.resumed_from or 0)
        qps_note = {} if math.isfinite(speed["qps"]) else {
            "qps_note": f"not measured: this process trained {trained} step(s), too few to pass the QPS warm-up"}
        return {
            "method": self.cfg.balance.method,
            "level": balance_level(self.cfg),
            "model": self.cfg.model.kind,
            "world_size": self.env.world_size,
            "global_batch_size": self.cfg.data.global_batch_size,
            "steps": self.step,
            "examples_seen": self.examples_seen,
            "qps": speed["qps"],
            **qps_note,
            "train_seconds": self.train_seconds if trained else math.nan,
            "eval_split": self.cfg.data.eval_split,
            "tasks": {
                t: {k: v for k, v in evaluation[t].items() if k in ("ne", "auc", "loss", "gauc", "calibration")}
                for t in self.tasks
            },
            "weights": None if weights is None else dict(zip(self.tasks, (float(w) for w in weights))),
            "grad_norms": dict(zip(self.tasks, (float(x) for x in stats["grad_norms"]))),
            "cosines": self._cosine_summary(stats["cosines"]),
            "balance_extra": self.balancer.extra_stats() if hasattr(self.balancer, "extra_stats") else None,
            "sharding": sharding_plan_summary(self.model),
            "skipped_rows": {
                "train": int(all_reduce_sum(torch.tensor([self.train_reader.skipped_rows]))[0]),
                **self.eval_skipped_rows,
            },
            "nonfinite_steps": self.nonfinite_total,
            "resumed_from_step": self.resumed_from,
        }

    def _cosine_summary(self, last: torch.Tensor) -> dict[str, dict[str, float]]:
        """Per task pair "a~b": the gradient cosine at the balance point at the last step and
        its mean over the run's progress points (whether the tasks conflict, and how much)."""
        points = [p["cosines"] for p in self.history.points if p.get("cosines")]
        out = {}
        for i, a in enumerate(self.tasks):
            for j in range(i + 1, len(self.tasks)):
                seen = [row[i][j] for row in points]
                out[f"{a}~{self.tasks[j]}"] = {"last": float(last[i, j]),
                                               "mean": sum(seen) / len(seen) if seen else math.nan}
        return out

    def run(self) -> dict[str, Any]:
        """Train to the last step, checkpoint, evaluate and write summary.json, history.json
        and config.json (strict JSON). A run resumed at its last step without a summary
        (stopped while evaluating) only evaluates."""
        summary = None
        advice = self.balancer.run_advice(self.total_steps)
        if advice and self.env.is_main and self.step < self.total_steps:
            print(f"recbalance: note: {advice}", flush=True)
        try:
            self.fit()
            if self.step != self.resumed_from:
                self.save_checkpoint()
            evaluation = self.evaluate(self.cfg.data.eval_split)
            self._report_eval(evaluation, self.cfg.data.eval_split)
            summary = self.summary(evaluation)
            if self.env.is_main:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                write_json(self.output_dir / "summary.json", summary, indent=2)
                write_json(self.output_dir / "history.json", self.history.points, indent=1)
                write_json(self.output_dir / "config.json", self.cfg.to_dict(), indent=2)
            return summary
        finally:
            for sink in self.sinks:
                sink.close(summary)

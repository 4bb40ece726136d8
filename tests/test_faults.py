"""Failures a Kubernetes batch job meets: a rank killed outright (SIGKILL) with restarts
allowed, preemption (SIGTERM), and non-finite steps."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import re
import sys
import threading
import time
from pathlib import Path

import torch

from tests.distributed_util import run_ranks
from tests.state_util import flat_tensors
from tests.test_cli_train import ROOT, tiny_overrides
from tests.test_sharded_equivalence import tiny_config

STEPS = 800
PROGRESS = re.compile(rf"step (\d+)/{STEPS} ")


def start_training(data: Path, out: Path, *extra: str, every: int = 20) -> subprocess.Popen:
    sets = [a for s in [f"train.steps={STEPS}", f"checkpoint.every={every}", "train.log_every=20"]
            for a in ("--set", s)]
    args = [sys.executable, "-m", "trainer.run.cli", "train", "--config", "configs/demo.toml",
            *tiny_overrides(data), *sets, "--output-dir", str(out), "--nproc-per-node", "2", *extra]
    # the tiny overrides' train.steps comes first; ours (later) wins
    # its own session, so that a failing test can stop the launcher and its ranks together
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


class Output:
    """The launcher's output, read on a thread as it comes (so that a test can wait for a
    step without blocking on a pipe and still get everything at the end)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(iter(proc.stdout.readline, "")),
                                       daemon=True)
        self.reader.start()

    def wait_for_step(self, step: int, timeout: float = 120) -> int:
        """Block until a progress line reports `step` or later; returns the step it reports."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reported = [int(m.group(1)) for line in list(self.lines) if (m := PROGRESS.match(line))]
            if reported and reported[-1] >= step:
                return reported[-1]
            assert self.proc.poll() is None or self.reader.is_alive(), self.text()
            time.sleep(0.05)
        raise AssertionError(f"no progress line for step {step}:\n{self.text()}")

    def finish(self, timeout: float) -> str:
        self.proc.wait(timeout=timeout)
        self.reader.join(timeout=30)
        return self.text()

    def text(self) -> str:
        return "".join(self.lines)


def stop_all(proc: subprocess.Popen) -> None:
    """Kill the launcher's whole process group (a no-op once it has ended)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def checkpoint_steps(out: Path) -> list[int]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name.split("-")[1]) for p in root.glob("step-*") if (p / "COMPLETE").exists())


def wait_for_checkpoint(out: Path, proc: subprocess.Popen, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = checkpoint_steps(out)
        if steps and steps[-1] >= 40:
            return steps[-1]
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def worker_pids(parent: int) -> list[int]:
    """The launcher's spawned rank processes (children running multiprocessing's spawn_main)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and "spawn_main" in cmdline and "resource_tracker" not in cmdline:
            pids.append(int(entry.name))
    return sorted(pids)


def test_sigkill_of_one_rank_restarts_and_resumes(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    # One restart, for the kill. (A restarted gloo group used to find the dead ranks'
    # addresses in torchelastic's shared store; trainer.run.distributed.attempt_store.)
    proc = start_training(tiny_dataset, out, "--max-restarts", "1")
    try:
        killed_after = wait_for_checkpoint(out, proc)
        ranks = worker_pids(proc.pid)
        assert len(ranks) == 2
        os.kill(ranks[-1], signal.SIGKILL)
        output, _ = proc.communicate(timeout=300)
    finally:
        stop_all(proc)
    assert proc.returncode == 0, output[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_step"] is not None and summary["resumed_from_step"] >= killed_after
    assert summary["steps"] == STEPS
    assert summary["examples_seen"] == STEPS * 64  # none skipped, none repeated
    assert "resumed from" in output


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_ranks_checkpoint_and_stop_when_the_launcher_is_killed(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    # no periodic checkpoints: any checkpoint there is the one the SIGTERM path wrote
    proc = start_training(tiny_dataset, out, every=0)
    output = Output(proc)
    try:
        reached = output.wait_for_step(40)
        ranks = worker_pids(proc.pid)
        assert len(ranks) == 2
        os.kill(proc.pid, signal.SIGKILL)  # the launcher only: its ranks are orphaned
        deadline = time.monotonic() + 120
        while any(_alive(pid) for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [pid for pid in ranks if _alive(pid)]
    finally:
        stop_all(proc)
    assert not left, f"ranks {left} of {ranks} outlived their launcher"
    saved = checkpoint_steps(out)
    assert len(saved) == 1 and reached <= saved[0] < STEPS, f"reached step {reached}; saved: {saved}"


def test_sigterm_saves_a_loadable_checkpoint(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    proc = start_training(tiny_dataset, out, every=0)  # the only checkpoint is SIGTERM's
    output = Output(proc)
    try:
        reached = output.wait_for_step(40)
        proc.send_signal(signal.SIGTERM)
        text = output.finish(timeout=120)
    finally:
        stop_all(proc)
    assert proc.returncode != 0
    stopped = re.search(r"SIGTERM: saved \S+ at step (\d+); rerun the same command to resume", text)
    assert stopped, text[-3000:]
    saved = checkpoint_steps(out)
    assert saved == [int(stopped.group(1))], saved
    assert reached <= saved[0] < STEPS and saved[0] % 10 == 0  # stops at the next all-rank check
    # rerunning the same command resumes from that checkpoint and finishes
    rerun = start_training(tiny_dataset, out)
    try:
        text, _ = rerun.communicate(timeout=300)
    finally:
        stop_all(rerun)
    assert rerun.returncode == 0, text[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_step"] == saved[0]
    assert summary["examples_seen"] == STEPS * 64


class PoisonedStream:
    """The real stream, with every batch's dense features set to NaN."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def __next__(self):
        batch = next(self.stream)
        batch.dense[:] = float("nan")
        return batch

    def state_dict(self):
        return self.stream.state_dict()


def nonfinite_run(config: dict, out_dir: str, poison_rank: int) -> dict:
    """Poison one rank's dense features with NaN for some steps; report what changed."""
    from trainer.config import config_from_dict
    from trainer.run.distributed import init_distributed, shutdown_distributed
    from trainer.core.guard import NonFiniteLimitError
    from trainer.core.trainer import Trainer

    torch.set_num_threads(1)
    env = init_distributed()
    trainer = Trainer(config_from_dict(config), env, Path(out_dir))
    trainer.fit(until_step=2)
    def dense_state() -> dict[str, torch.Tensor]:
        """Everything but the sharded tables: dense parameters, buffers, the balancer's state."""
        return flat_tensors({k: v for k, v in trainer.ranker.state_dict().items() if not hasattr(v, "local_shards")})

    before = {k: v.clone() for k, v in dense_state().items()}
    assert any("balancer._extra_state" in k for k in before)  # MultiBalance's lambdas and EMA are compared too
    shards_before = [s.tensor.clone() for v in trainer.model.state_dict().values() if hasattr(v, "local_shards")
                     for s in v.local_shards()]
    batch = next(trainer.stream)
    if env.rank == poison_rank:
        batch.dense[0, 0] = float("nan")
    result = trainer.train_step(batch)
    after = dense_state()
    shards_after = [s.tensor for v in trainer.model.state_dict().values() if hasattr(v, "local_shards")
                    for s in v.local_shards()]
    unchanged = before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before) and all(
        torch.equal(a, b) for a, b in zip(shards_before, shards_after))
    # then the limit: every batch poisoned until the run saves and stops
    trainer.stream = PoisonedStream(trainer.stream)
    message = ""
    try:
        trainer.fit()
    except NonFiniteLimitError as err:
        message = str(err)
    steps = trainer.step
    shutdown_distributed()
    return {"nonfinite": result.nonfinite, "unchanged": unchanged, "message": message, "step": steps,
            "total": trainer.nonfinite_total}


def test_nonfinite_step_is_skipped_on_every_rank_and_limit_stops(tiny_dataset, tmp_path):
    config = tiny_config(tiny_dataset, "table_wise", "mmoe", "multibalance")
    config["train"].update(steps=50, max_nonfinite_in_row=3, embedding_optimizer="rowwise_adagrad")
    got = run_ranks(nonfinite_run, 2, config, str(tmp_path), 1)
    for rank in (0, 1):
        assert got[rank]["nonfinite"] is True  # rank 0's batch was fine: it skips too
        assert got[rank]["unchanged"] is True  # parameters, embeddings, balancer state untouched
        assert "3 non-finite steps in a row" in got[rank]["message"]
        assert got[rank]["total"] == 3  # counted by fit(); the first, direct train_step is not
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert saved and saved[-1] == f"step-{got[0]['step']:09d}"

"""What every rank runs: join the process group, train, evaluate, write the run's files."""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from trainer.run.allocator import keep_freed_memory
from trainer.config import config_from_dict
from trainer.run.distributed import init_distributed, shutdown_distributed


PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what Kubernetes expects of a terminated container
_PR_SET_PDEATHSIG = 1


def quiet_libraries() -> None:
    """TorchRec's planner and DDP warn about things that are expected on CPU; keep the
    user's console for progress lines."""
    warnings.filterwarnings("ignore")
    for name in ("torchrec", "root", "torch.distributed", "torch.fx"):
        logging.getLogger(name).setLevel(logging.ERROR)


def stop_with_launcher() -> None:
    """Have the kernel send this rank SIGTERM when its launcher dies (Linux prctl
    PR_SET_PDEATHSIG): a rank orphaned by a killed launcher would otherwise wait in a
    collective until the timeout. SIGTERM takes the usual path: checkpoint, exit 143."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def run_worker(config: dict[str, Any], output_dir: str) -> dict[str, Any]:
    """One rank's whole run; returns the run's summary (rank 0's is the one reported)."""
    stop_with_launcher()
    quiet_libraries()
    keep_freed_memory()
    cfg = config_from_dict(config)
    torch.set_num_threads(cfg.train.threads_per_rank)
    env = init_distributed(cfg.train.device)
    from trainer.core.trainer import Preempted, Trainer
    from trainer.observe.sinks import make_sinks

    # No try/finally: after an error a peer may sit in a collective forever, so the shutdown
    # barrier would hang; raising ends this process and the launcher stops the others.
    trainer = Trainer(cfg, env, Path(output_dir))
    finished = trainer.finished_summary()
    if finished is not None:  # a rerun of a complete run: report it, start no exporter, write nothing
        shutdown_distributed()
        return finished
    trainer.sinks.extend(make_sinks(cfg, env, Path(output_dir), trainer.history))
    # Kubernetes preemption and torchrun's shutdown send SIGTERM: checkpoint, then stop.
    signal.signal(signal.SIGTERM, lambda *_: setattr(trainer, "stop_requested", True))
    try:
        summary = trainer.run()
    except Preempted as stop:
        if env.is_main:
            print(f"recbalance: {stop}", flush=True)
        raise SystemExit(PREEMPTED_EXIT_CODE) from None
    shutdown_distributed()
    return summary


def under_launcher() -> bool:
    """True when torchrun / torchx already started this process as one rank of a job."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)

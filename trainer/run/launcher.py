"""Start N local ranks through torch's elastic launcher (the engine behind torchrun and
torchx's dist.ddp), so `recbalance train --nproc-per-node N` and a torchx job run the same
worker code."""
from __future__ import annotations

import logging
import uuid
from typing import Any

from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from trainer.run.distributed import free_port
from trainer.run.worker import run_worker


# Loggers that print a failed rank's traceback, wrapped in the launcher's own, line by line;
# the CLI reports the rank's error message instead (trainer.run.cli.root_cause).
_TRACEBACK_LOGGERS = ("torch.distributed.elastic.multiprocessing.api", "torch.multiprocessing.spawn")


def launch_local(config: dict[str, Any], output_dir: str, nproc_per_node: int, max_restarts: int = 0) -> dict[str, Any]:
    """Run `run_worker` on nproc_per_node local processes; returns rank 0's summary."""
    for name in _TRACEBACK_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    launch = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc_per_node,
        run_id=f"recbalance-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        max_restarts=max_restarts,
        monitor_interval=0.5,
        start_method="spawn",
    )
    results = elastic_launch(launch, run_worker)(config, output_dir)
    return results[0]

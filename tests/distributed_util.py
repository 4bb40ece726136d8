"""Run a function on N local gloo ranks through torch's elastic launcher (as TorchRec's own
CPU tests do) and collect each rank's return value."""
from __future__ import annotations

import uuid
from typing import Any, Callable

from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from trainer.run.distributed import free_port


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, max_restarts: int = 0) -> dict[int, Any]:
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=world_size, run_id=f"test-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}", max_restarts=max_restarts,
        monitor_interval=0.2, start_method="spawn",
    )
    return elastic_launch(config, fn)(*args)

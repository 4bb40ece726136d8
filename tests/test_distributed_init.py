"""A restarted attempt must not see the failed attempt's keys in torchelastic's shared store:
they held the dead ranks' gloo addresses, and a restarted group connected to them."""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from tests.distributed_util import run_ranks


def write_then_fail_once() -> dict[str, bool]:
    from trainer.run.distributed import attempt_store, init_distributed, shutdown_distributed

    attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    world = int(os.environ["WORLD_SIZE"])
    key = f"probe/{os.environ['RANK']}"
    ours = attempt_store(world)
    shared = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False)
    if attempt == 0:
        ours.set(key, "attempt 0")
        sys.exit(1)  # the launcher restarts both ranks
    seen = {"ours": ours.check([key]), "shared": shared.check([f"recbalance/attempt_0/{key}"])}
    env = init_distributed()  # the default group is built on the attempt's store and works
    total = torch.ones(1)
    dist.all_reduce(total)
    seen["group"] = env.world_size == 2 and float(total) == 2.0
    shutdown_distributed()
    return seen


def test_restarted_attempt_gets_fresh_keys():
    got = run_ranks(write_then_fail_once, 2, max_restarts=1)
    for rank in (0, 1):
        # the shared store still holds attempt 0's key; the attempt's own namespace does not
        assert got[rank] == {"ours": False, "shared": True, "group": True}

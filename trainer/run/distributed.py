"""Process-group lifecycle and the gradient reduction rule that makes N ranks train like one
process on the global batch."""
from __future__ import annotations

import os
from datetime import timedelta
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trainer.config import ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(kind: str, local_ranks: int = 1) -> str:
    """``train.device`` -> "cuda" or "cpu" ("auto": CUDA when this process sees a GPU).
    "cuda" without a GPU for each of ``local_ranks`` ranks is a config error."""
    if kind == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if found < local_ranks:
            raise ConfigError(
                f"config key 'train.device': 'cuda' needs one GPU per local rank ({local_ranks}), this machine "
                f"has {found} usable (torch {torch.__version__}); allowed: 'auto', 'cpu', 'cuda'"
            )
    return kind


def process_group_backend(device_type: str) -> str:
    """NCCL for CUDA tensors, gloo for the CPU ones (control flags, counters) in one default
    group on GPU; gloo alone on CPU."""
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


def init_distributed(device_kind: str = "auto") -> DistEnv:
    """Join the job's process group: NCCL on GPU, gloo on CPU, same code path. Outside a
    launcher (no RANK in the environment) this is a group of one, so the single-process
    path is the distributed path with world size 1."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if resolve_device(device_kind, local_ranks) == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = process_group_backend(device.type)
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            os.environ["MASTER_ADDR"] = "127.0.0.1"
            os.environ["MASTER_PORT"] = str(free_port())
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=collective_timeout(),
                                store=attempt_store(world_size))
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def attempt_store(world_size: int) -> dist.Store | None:
    """The job's key-value store, namespaced by restart attempt, when torchelastic shares its
    agent's TCPStore with the workers (its default); None otherwise (env:// as usual).

    That store outlives a failed attempt, and torch does not prefix the workers' keys per
    attempt, so a restarted rank could read the dead ranks' gloo addresses and connect to a
    dead peer ("connectFullMesh ... Connection refused") or hang in ProcessGroupGloo's
    constructor (seen after a SIGKILL + restart). A prefix per TORCHELASTIC_RESTART_COUNT
    gives every attempt fresh keys."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    shared = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                           is_master=False, timeout=collective_timeout())
    return dist.PrefixStore(f"recbalance/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", shared)


def collective_timeout() -> timedelta:
    """How long a collective may wait for a peer before the rank fails (instead of hanging):
    RECBALANCE_COLLECTIVE_TIMEOUT_S, default 30 minutes."""
    return timedelta(seconds=float(os.environ.get("RECBALANCE_COLLECTIVE_TIMEOUT_S", "1800")))


def shutdown_distributed() -> None:
    """Barrier first: tearing down while a peer is still in a collective aborts it."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

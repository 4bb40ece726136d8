"""Cross-rank reduction of the balance statistics (the "Gram first" rule).

Each data-parallel rank holds the LOCAL rows of the global-batch per-task gradients, so
inner products over the global batch are sums of local inner products: the global Gram
matrix is an all-reduce (SUM) of the local M x M Gram. That is the only communication the
inner-product methods add.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist


def is_distributed(process_group: Optional[Any] = None) -> bool:
    """True when torch.distributed is initialised and the group has more than one rank."""
    return world_size(process_group) > 1


def world_size(process_group: Optional[Any] = None) -> int:
    """Number of ranks of ``process_group`` (default group when None); 1 when not distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def rank(process_group: Optional[Any] = None) -> int:
    """This process's rank in ``process_group``; 0 when not distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(process_group)


def all_reduce_sum(tensor: torch.Tensor, process_group: Optional[Any] = None) -> torch.Tensor:
    """Sum of ``tensor`` over the ranks (a new tensor; the input is left untouched)."""
    if not is_distributed(process_group):
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=process_group)
    return out


def reduce_gram(local_gram: torch.Tensor, process_group: Optional[Any] = None) -> torch.Tensor:
    """Global-batch Gram matrix [M, M] from this rank's local Gram (all-reduce SUM of M² numbers).

    Every rank receives the same (bitwise identical) result, so every rank derives the same
    weights from it.
    """
    return all_reduce_sum(local_gram, process_group)

"""The unit of work handed to the model: one local batch of dense, sparse and label tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


@dataclass
class Batch:
    """One local batch.

    dense: [B, num_dense] float32; sparse: KJT with schema sparse names as keys (schema
    order), int64 values, int32 lengths [B] per key; labels: [M, B] float32 in {0, 1};
    weights: [B] float32, 1 for real rows, 0 for padding rows and skipped bad rows;
    user_ids: [B] int64 when the schema names a user_id column, else None.
    """

    dense: torch.Tensor
    sparse: KeyedJaggedTensor
    labels: torch.Tensor
    weights: torch.Tensor
    user_ids: torch.Tensor | None = None

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        """Copy every tensor to ``device``."""
        return Batch(
            dense=self.dense.to(device, non_blocking=non_blocking),
            sparse=self.sparse.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
            weights=self.weights.to(device, non_blocking=non_blocking),
            user_ids=None if self.user_ids is None else self.user_ids.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> "Batch":
        """Page-locked copy, so ``to(cuda, non_blocking=True)`` overlaps with compute."""
        return Batch(
            dense=self.dense.pin_memory(),
            sparse=self.sparse.pin_memory(),
            labels=self.labels.pin_memory(),
            weights=self.weights.pin_memory(),
            user_ids=None if self.user_ids is None else self.user_ids.pin_memory(),
        )

    def __len__(self) -> int:
        return int(self.weights.shape[0])

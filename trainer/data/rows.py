"""Decoded rows in numpy form, and the few operations the reader needs on them.

A ``RowBlock`` is what a row group becomes after validation: plain numpy arrays that
can be permuted, sliced, concatenated across row groups and padded, then turned into a
``Batch``. Sparse features are jagged (values + lengths) so multi-hot works the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from trainer.data.batch import Batch
from trainer.data.schema import Schema


@dataclass
class Jagged:
    """Ids of one sparse feature for n rows: ``values`` int64 [sum(lengths)], ``lengths`` int32 [n]."""

    values: np.ndarray
    lengths: np.ndarray

    def take(self, idx: np.ndarray) -> "Jagged":
        lengths = self.lengths[idx]
        if len(self.values) == len(self.lengths) and (len(self.lengths) == 0 or self.lengths.min() == 1):
            return Jagged(self.values[idx], lengths)  # single-hot fast path
        offsets = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=offsets[1:])
        total = int(lengths.sum())
        new_offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths, out=new_offsets[1:])
        gather = np.arange(total, dtype=np.int64) + np.repeat(offsets[:-1][idx] - new_offsets[:-1], lengths)
        return Jagged(self.values[gather], lengths)

    @staticmethod
    def concat(parts: list["Jagged"]) -> "Jagged":
        return Jagged(np.concatenate([p.values for p in parts]), np.concatenate([p.lengths for p in parts]))


@dataclass
class RowBlock:
    """n decoded rows. ``real`` is False for padding rows; ``skipped`` marks bad rows kept as weight 0."""

    dense: np.ndarray            # [n, D] float32
    labels: np.ndarray           # [n, M] float32
    sparse: list[Jagged]         # one per schema sparse feature
    user_ids: np.ndarray | None  # [n] int64
    real: np.ndarray             # [n] bool
    skipped: np.ndarray          # [n] bool

    def __len__(self) -> int:
        return int(self.real.shape[0])

    def take(self, idx: np.ndarray) -> "RowBlock":
        return RowBlock(
            dense=self.dense[idx], labels=self.labels[idx], sparse=[j.take(idx) for j in self.sparse],
            user_ids=None if self.user_ids is None else self.user_ids[idx],
            real=self.real[idx], skipped=self.skipped[idx])

    def slice(self, start: int, stop: int) -> "RowBlock":
        return self.take(np.arange(start, min(stop, len(self)), dtype=np.int64))

    @staticmethod
    def concat(parts: list["RowBlock"]) -> "RowBlock":
        if len(parts) == 1:
            return parts[0]
        return RowBlock(
            dense=np.concatenate([p.dense for p in parts]),
            labels=np.concatenate([p.labels for p in parts]),
            sparse=[Jagged.concat([p.sparse[k] for p in parts]) for k in range(len(parts[0].sparse))],
            user_ids=None if parts[0].user_ids is None else np.concatenate([p.user_ids for p in parts]),
            real=np.concatenate([p.real for p in parts]),
            skipped=np.concatenate([p.skipped for p in parts]))

    @staticmethod
    def padding(schema: Schema, n: int) -> "RowBlock":
        """n weight-0 rows: dense 0, labels 0, id 0 (one id for single-hot, empty bag for multi-hot)."""
        sparse = []
        for f in schema.sparse:
            if f.multi_hot:
                sparse.append(Jagged(np.zeros(0, np.int64), np.zeros(n, np.int32)))
            else:
                sparse.append(Jagged(np.zeros(n, np.int64), np.ones(n, np.int32)))
        return RowBlock(
            dense=np.zeros((n, len(schema.dense)), np.float32),
            labels=np.zeros((n, len(schema.labels)), np.float32),
            sparse=sparse,
            user_ids=None if schema.user_id is None else np.zeros(n, np.int64),
            real=np.zeros(n, bool), skipped=np.zeros(n, bool))

    def to_batch(self, keys: list[str]) -> Batch:
        """Convert to torch tensors (copies, so the batch owns its memory)."""
        values = np.concatenate([j.values for j in self.sparse]) if self.sparse else np.zeros(0, np.int64)
        lengths = np.concatenate([j.lengths for j in self.sparse]) if self.sparse else np.zeros(0, np.int32)
        kjt = KeyedJaggedTensor(
            keys=list(keys),
            values=torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64)),
            lengths=torch.from_numpy(np.ascontiguousarray(lengths, dtype=np.int32)))
        weights = (self.real & ~self.skipped).astype(np.float32)
        return Batch(
            dense=torch.from_numpy(np.ascontiguousarray(self.dense, dtype=np.float32)),
            sparse=kjt,
            labels=torch.from_numpy(np.ascontiguousarray(self.labels.T, dtype=np.float32)),
            weights=torch.from_numpy(weights),
            user_ids=None if self.user_ids is None else torch.from_numpy(
                np.ascontiguousarray(self.user_ids, dtype=np.int64)))

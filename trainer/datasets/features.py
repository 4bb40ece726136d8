"""Column transforms of the CSV converter: numeric parsing, normalisation statistics,
categorical vocabularies, stable string hashing, seeded row assignment.

All statistics come from the TRAINING rows only and are applied unchanged to
valid/test, so evaluation never leaks into preprocessing.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from trainer.data.errors import DataError

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def parse_float(col: pa.Array, *, file: str, column: str, first_line: int) -> np.ndarray:
    """float64 values of a string column; nulls and 'nan' -> NaN; anything else unparseable -> DataError."""
    try:
        values = pc.cast(col, pa.float64())
    except pa.ArrowInvalid:
        texts = col.to_pylist()
        for i, t in enumerate(texts):
            if t is None:
                continue
            try:
                float(t)
            except ValueError:
                raise DataError(f"{file}: column '{column}', line {first_line + i}: {t!r} is not a number",
                                file=file, column=column) from None
        raise DataError(f"{file}: column '{column}' (block from line {first_line}): not numeric",
                        file=file, column=column) from None
    out = values.to_numpy(zero_copy_only=False).astype(np.float64)  # nulls -> NaN
    inf = np.isinf(out)
    if inf.any():
        i = int(np.flatnonzero(inf)[0])
        raise DataError(f"{file}: column '{column}', line {first_line + i}: infinite value {col[i].as_py()!r}",
                        file=file, column=column)
    return out


def signed_log1p(x: np.ndarray) -> np.ndarray:
    """sign(x)·log(1 + |x|): compresses heavy tails (counts, money) and keeps negatives distinct."""
    return np.sign(x) * np.log1p(np.abs(x))


@dataclass
class RunningStats:
    """Mean/std of a numeric column, merged block by block (Chan et al.), NaN = missing."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    missing: int = 0

    def update(self, x: np.ndarray) -> None:
        present = x[~np.isnan(x)]
        self.missing += int(len(x) - len(present))
        n = len(present)
        if n == 0:
            return
        mean = float(present.mean())
        m2 = float(((present - mean) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        """Population std; 1 for constant or empty columns so normalisation never divides by 0."""
        if self.count < 2:
            return 1.0
        s = math.sqrt(self.m2 / self.count)
        return s if s > 1e-12 else 1.0


@dataclass
class DenseTransform:
    """missing -> 0 after (optional signed log1p then) standardisation with training mean/std."""

    name: str
    log1p: bool
    stats: RunningStats = field(default_factory=RunningStats)

    def raw(self, x: np.ndarray) -> np.ndarray:
        return signed_log1p(x) if self.log1p else x

    def apply(self, x: np.ndarray) -> np.ndarray:
        z = (self.raw(x) - self.stats.mean) / self.stats.std
        return np.where(np.isnan(z), 0.0, z).astype(np.float32)


@dataclass
class Vocabulary:
    """Categorical strings -> ids 1..V by training frequency; missing, unseen and rare -> 0 (OOV)."""

    name: str
    min_count: int = 1
    counts: Counter = field(default_factory=Counter)
    values: pa.Array | None = None

    def update(self, col: pa.Array) -> None:
        vc = pc.value_counts(pc.drop_null(col))
        self.counts.update(dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist())))

    def freeze(self) -> None:
        kept = [(v, c) for v, c in self.counts.items() if c >= self.min_count]
        kept.sort(key=lambda vc: (-vc[1], vc[0]))
        self.values = pa.array([v for v, _ in kept], pa.string())
        self.counts = Counter()  # release memory; the frozen array is all pass 2 needs

    @property
    def num_embeddings(self) -> int:
        assert self.values is not None, "freeze() first"
        return len(self.values) + 1

    def apply(self, col: pa.Array) -> np.ndarray:
        assert self.values is not None, "freeze() first"
        idx = pc.index_in(col, value_set=self.values)
        return pc.fill_null(idx, -1).to_numpy(zero_copy_only=False).astype(np.int64) + 1


def fnv1a64(col: pa.Array) -> np.ndarray:
    """Stable 64-bit FNV-1a hash of each UTF-8 string (vectorised over byte positions; nulls hash as '')."""
    arr = pc.fill_null(col, "").cast(pa.large_string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset: arr.offset + n + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8) if arr.buffers()[2] is not None else np.zeros(0, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    h = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    max_len = int(lengths.max()) if n else 0
    with np.errstate(over="ignore"):
        for j in range(max_len):
            active = np.flatnonzero(lengths > j)
            h[active] = (h[active] ^ data[starts[active] + j].astype(np.uint64)) * _FNV_PRIME
    return h


@dataclass
class Hasher:
    """Categorical strings -> 1 + fnv1a64 % (size - 1); missing -> 0. Needs no vocabulary pass."""

    name: str
    size: int

    @property
    def num_embeddings(self) -> int:
        return self.size

    def apply(self, col: pa.Array) -> np.ndarray:
        ids = (fnv1a64(col) % np.uint64(self.size - 1)).astype(np.int64) + 1
        ids[col.is_null().to_numpy(zero_copy_only=False)] = 0
        return ids


def splitmix64(seed: int, index: np.ndarray) -> np.ndarray:
    """Counter-based uniform 64-bit hash of (seed, row index): same answer however rows are chunked."""
    with np.errstate(over="ignore"):
        z = index.astype(np.uint64) + np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def uniform01(seed: int, index: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) per row index, from ``splitmix64``."""
    return (splitmix64(seed, index) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def auto_embedding_dim(num_embeddings: int) -> int:
    """min(16, 6·n^0.25) rounded up to a multiple of 4 (FBGEMM kernels want D % 4 == 0)."""
    return int(min(16, 4 * math.ceil(6 * num_embeddings ** 0.25 / 4)))

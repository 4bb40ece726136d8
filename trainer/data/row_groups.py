"""Which rows each rank reads: (file, row group) units, their order per epoch, step counts.

Everything here uses Parquet footers only (no data pages), so every rank derives the
same plan and the same ``batches_per_epoch`` without communicating.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from trainer.data.decode import check_file_schema
from trainer.data.errors import DataError
from trainer.data.schema import Schema


@dataclass(frozen=True)
class Unit:
    """One non-empty row group: the indivisible piece of work ranks are assigned."""

    index: int          # position in the global (sorted) enumeration
    file: str
    row_group: int
    num_rows: int


@dataclass
class SplitIndex:
    """The units of one split plus the footers needed to reopen files cheaply."""

    split: str
    units: list[Unit]
    metadata: dict[str, pq.FileMetaData]

    @property
    def num_rows(self) -> int:
        return sum(u.num_rows for u in self.units)


def open_parquet(file: str, metadata: pq.FileMetaData | None = None) -> pq.ParquetFile:
    """Open a Parquet file, turning pyarrow's corruption errors into a ``DataError`` naming it."""
    try:
        return pq.ParquetFile(file, metadata=metadata)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{file}: not a readable Parquet file (truncated or corrupt?): {e}", file=file) from e


def index_split(root: str | Path, split: str, schema: Schema) -> SplitIndex:
    """Enumerate the units of ``root/split`` in sorted file order and check every footer."""
    directory = Path(root) / split
    if not directory.is_dir():
        raise DataError(f"{directory}: split '{split}' not found (expected a directory of Parquet files)",
                        file=str(directory))
    files = sorted(str(p) for p in directory.iterdir() if p.suffix == ".parquet" and p.is_file())
    if not files:
        raise DataError(f"{directory}: split '{split}' has no .parquet files", file=str(directory))
    units: list[Unit] = []
    metadata: dict[str, pq.FileMetaData] = {}
    for file in files:
        pf = open_parquet(file)
        check_file_schema(pf.schema_arrow, schema, file)
        metadata[file] = pf.metadata
        for rg in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(rg).num_rows
            if n > 0:
                units.append(Unit(len(units), file, rg, n))
    if not units:
        raise DataError(f"{directory}: split '{split}' has no rows (all {len(files)} Parquet file(s) are empty)",
                        file=str(directory))
    return SplitIndex(split, units, metadata)


def unit_order(num_units: int, *, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """Global unit order of an epoch: identity, or a permutation seeded by (seed, epoch)."""
    if not shuffle:
        return np.arange(num_units)
    return np.random.default_rng([seed, epoch]).permutation(num_units)


def row_order(num_rows: int, *, shuffle: bool, seed: int, epoch: int, unit: int) -> np.ndarray | None:
    """Row order inside a unit (None = natural order), seeded by (seed, epoch, unit)."""
    if not shuffle:
        return None
    return np.random.default_rng([seed, epoch, unit]).permutation(num_rows)


def rank_units(index: SplitIndex, order: np.ndarray, rank: int, world_size: int) -> list[Unit]:
    """Rank r takes units r::world_size of the epoch's order."""
    return [index.units[i] for i in order[rank::world_size]]


def batches_per_epoch(index: SplitIndex, local_batch_size: int, world_size: int, *,
                      shuffle: bool, drop_last: bool) -> int:
    """Steps per epoch, identical on every rank and valid for every epoch.

    Without shuffle the assignment is fixed, so this is exact. With shuffle the
    assignment changes per epoch, so this is a bound over all assignments: with
    drop_last the fewest rows any rank can get (the smallest floor(U/W) units), without
    drop_last the most (the largest ceil(U/W) units). Padding covers the difference.
    """
    sizes = np.array([u.num_rows for u in index.units], dtype=np.int64)
    if len(sizes) < world_size:
        raise DataError(
            f"split '{index.split}' has {len(sizes)} non-empty row group(s) but world_size={world_size}; every rank "
            "needs at least one row group — rewrite the data with smaller row groups (e.g. --row-group-size)",
            file=None)
    if shuffle:
        few, many = len(sizes) // world_size, math.ceil(len(sizes) / world_size)
        sorted_sizes = np.sort(sizes)
        min_rows = int(sorted_sizes[:few].sum())
        max_rows = int(sorted_sizes[::-1][:many].sum())
    else:
        per_rank = [int(sizes[r::world_size].sum()) for r in range(world_size)]
        min_rows, max_rows = min(per_rank), max(per_rank)
    if drop_last:
        n = min_rows // local_batch_size
        if n == 0:
            raise DataError(
                f"split '{index.split}': a rank may get only {min_rows} row(s), fewer than local_batch_size="
                f"{local_batch_size}, so drop_last leaves no batch; use a smaller batch or more data")
        return n
    return math.ceil(max_rows / local_batch_size)

"""ParquetReader: a rank's deterministic, sharded, prefetched stream of ``Batch``es.

Units are (file, row group) pairs; see ``sharding`` for who reads what and ``decode`` for
validation. Rows stream across unit boundaries into fixed-size local batches. Memory is
bounded by one row group plus ``prefetch`` batches, whatever the dataset size.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from trainer.data.batch import Batch
from trainer.data.decode import BAD_ROW_POLICIES, ID_POLICIES, decode_row_group
from trainer.data.errors import DataError
from trainer.data.prefetch import PrefetchIterator
from trainer.data.rows import RowBlock
from trainer.data.schema import Schema
from trainer.data.row_groups import Unit, batches_per_epoch, index_split, open_parquet, rank_units, row_order, unit_order

# (batch, real rows in it, skipped rows in it)
_Item = tuple[Batch, int, int]


class ParquetReader:
    """Reads split ``split`` of the dataset at ``root`` for one rank.

    ``batches_per_epoch`` is identical on every rank (footers only). With ``drop_last``
    every rank yields exactly that many full batches; without it, every real row of the
    rank is yielded exactly once and the rest is weight-0 padding. ``rows_read`` (real
    row slots, bad ones included) and ``skipped_rows`` count what the consumer has
    received so far, over all epochs.
    """

    def __init__(self, root: str | Path, schema: Schema, split: str, local_batch_size: int, rank: int,
                 world_size: int, *, shuffle: bool, seed: int, drop_last: bool, prefetch: int = 2,
                 id_policy: str = "hash", bad_rows: str = "error", pin_memory: bool = False) -> None:
        _check_args(local_batch_size, rank, world_size, prefetch, id_policy, bad_rows, seed)
        self.root = Path(root)
        self.schema = schema
        self.split = split
        self.local_batch_size = local_batch_size
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.prefetch = prefetch
        self.id_policy = id_policy
        self.bad_rows = bad_rows
        self.pin_memory = pin_memory
        self.index = index_split(self.root, split, schema)
        self.batches_per_epoch: int = batches_per_epoch(
            self.index, local_batch_size, world_size, shuffle=shuffle, drop_last=drop_last)
        self.skipped_rows = 0
        self.rows_read = 0

    @property
    def num_rows(self) -> int:
        """Rows of the whole split (all ranks)."""
        return self.index.num_rows

    def units(self, epoch: int) -> list[Unit]:
        """This rank's units for ``epoch``, in reading order."""
        order = unit_order(len(self.index.units), shuffle=self.shuffle, seed=self.seed, epoch=epoch)
        return rank_units(self.index, order, self.rank, self.world_size)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Batches of ``epoch`` from batch ``start_batch`` on (earlier ones skipped without decoding)."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        if not isinstance(start_batch, int) or start_batch < 0:
            raise ValueError(f"start_batch must be an integer >= 0, got {start_batch!r}")
        source = self._produce(epoch, start_batch)
        if self.pin_memory:  # page-locked in the prefetch thread, so the copy to the GPU is asynchronous
            source = ((batch.pin_memory(), real, skipped) for batch, real, skipped in source)
        return _EpochIterator(self, PrefetchIterator(source, self.prefetch) if self.prefetch > 0 else source)

    # ---- producer side (runs in the prefetch thread) -----------------------------------
    def _read_unit(self, unit: Unit, epoch: int, cache: dict[str, pq.ParquetFile]) -> RowBlock:
        pf = cache.get(unit.file)
        if pf is None:
            cache.clear()
            pf = cache[unit.file] = open_parquet(unit.file, self.index.metadata[unit.file])
        try:
            table = pf.read_row_group(unit.row_group)
        except (pa.ArrowException, OSError) as e:
            column = _corrupt_column(pf, unit.row_group)
            where = f"column '{column}', " if column else ""
            raise DataError(f"{unit.file}: {where}row group {unit.row_group}: cannot read (corrupt file?): {e}",
                            file=unit.file, column=column, row_group=unit.row_group) from e
        if table.num_rows != unit.num_rows:
            raise DataError(f"{unit.file}: row group {unit.row_group} has {table.num_rows} rows but its footer "
                            f"says {unit.num_rows} (corrupt file?)", file=unit.file, row_group=unit.row_group)
        block = decode_row_group(table, self.schema, file=unit.file, row_group=unit.row_group,
                                 id_policy=self.id_policy, bad_rows=self.bad_rows)
        perm = row_order(len(block), shuffle=self.shuffle, seed=self.seed, epoch=epoch, unit=unit.index)
        return block if perm is None else block.take(perm)

    def _produce(self, epoch: int, start_batch: int) -> Iterator[_Item]:
        size, total = self.local_batch_size, self.batches_per_epoch
        keys = self.schema.sparse_names
        emitted = start_batch
        if emitted >= total:
            return
        skip = start_batch * size
        pending: list[RowBlock] = []  # blocks whose rows are not yet in a batch
        offset = 0                    # rows of pending[0] already used
        buffered = 0
        cache: dict[str, pq.ParquetFile] = {}
        for unit in self.units(epoch):
            if skip >= unit.num_rows:
                skip -= unit.num_rows  # already consumed before a resume: not even read
                continue
            block = self._read_unit(unit, epoch, cache)
            if skip:
                block, skip = block.slice(skip, len(block)), 0
            pending.append(block)
            buffered += len(block)
            while buffered >= size and emitted < total:
                pieces, need = [], size
                while need:
                    head = pending[0]
                    take = min(need, len(head) - offset)
                    pieces.append(head.slice(offset, offset + take))
                    need -= take
                    offset += take
                    if offset == len(head):
                        pending.pop(0)
                        offset = 0
                buffered -= size
                yield _item(RowBlock.concat(pieces), keys)
                emitted += 1
            if emitted >= total:
                return
        if self.drop_last:
            raise AssertionError(  # cannot happen: batches_per_epoch is a lower bound of every rank's batches
                f"rank {self.rank} ran out of rows after {emitted} of {total} batches in split '{self.split}'")
        if buffered:
            rest = [pending[0].slice(offset, len(pending[0])), *pending[1:]]
            rest.append(RowBlock.padding(self.schema, size - buffered))
            yield _item(RowBlock.concat(rest), keys)
            emitted += 1
        while emitted < total:
            yield _item(RowBlock.padding(self.schema, size), keys)
            emitted += 1


def _corrupt_column(pf: pq.ParquetFile, row_group: int) -> str | None:
    """The first column of ``row_group`` that fails to decode on its own (None if none does)."""
    for name in pf.schema_arrow.names:
        try:
            pf.read_row_group(row_group, columns=[name])
        except (pa.ArrowException, OSError):
            return name
    return None


def _item(block: RowBlock, keys: list[str]) -> _Item:
    return block.to_batch(keys), int(block.real.sum()), int(block.skipped.sum())


class _EpochIterator:
    """Consumer side: yields batches, updates the reader's counters, stops the thread on close."""

    def __init__(self, reader: ParquetReader, source: Iterator[_Item]) -> None:
        self._reader = reader
        self._source = source

    def __iter__(self) -> "_EpochIterator":
        return self

    def __next__(self) -> Batch:
        batch, real, skipped = next(self._source)
        self._reader.rows_read += real
        self._reader.skipped_rows += skipped
        return batch

    def close(self) -> None:
        close = getattr(self._source, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "_EpochIterator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


def _check_args(local_batch_size: int, rank: int, world_size: int, prefetch: int, id_policy: str,
                bad_rows: str, seed: int) -> None:
    if not isinstance(local_batch_size, int) or local_batch_size <= 0:
        raise ValueError(f"local_batch_size must be a positive integer, got {local_batch_size!r}")
    if not isinstance(world_size, int) or world_size <= 0:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
    if not isinstance(prefetch, int) or prefetch < 0:
        raise ValueError(f"prefetch must be an integer >= 0, got {prefetch!r}")
    if id_policy not in ID_POLICIES:
        raise ValueError(f"id_policy must be one of {list(ID_POLICIES)}, got {id_policy!r}")
    if bad_rows not in BAD_ROW_POLICIES:
        raise ValueError(f"bad_rows must be one of {list(BAD_ROW_POLICIES)}, got {bad_rows!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")


__all__ = ["ParquetReader"]

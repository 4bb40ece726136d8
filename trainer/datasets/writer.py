"""Write a dataset directory: ``schema.json`` plus ``<split>/part-XXXXX.parquet`` files.

Row groups have a fixed size (the last one of a split may be smaller) so the reader can
shard by row group; ``SplitWriter`` streams, so builders never hold a whole split.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from trainer.data.schema import Schema

DEFAULT_ROW_GROUP_SIZE = 4096
DEFAULT_ROW_GROUPS_PER_FILE = 256
SPLITS = ("train", "valid", "test")


def arrow_schema(schema: Schema) -> pa.Schema:
    """The Parquet column types a dataset of ``schema`` is written with."""
    fields = [pa.field(n, pa.float32()) for n in schema.labels]
    fields += [pa.field(n, pa.float32()) for n in schema.dense]
    fields += [pa.field(f.name, pa.list_(pa.int64()) if f.multi_hot else pa.int64()) for f in schema.sparse]
    if schema.user_id is not None and schema.user_id not in schema.sparse_names:
        fields.append(pa.field(schema.user_id, pa.int64()))
    return pa.schema(fields)


class SplitWriter:
    """Appends tables to ``out_dir/split`` as row groups of exactly ``row_group_size`` rows."""

    def __init__(self, out_dir: str | Path, split: str, schema: pa.Schema, *,
                 row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
                 row_groups_per_file: int = DEFAULT_ROW_GROUPS_PER_FILE) -> None:
        if row_group_size <= 0 or row_groups_per_file <= 0:
            raise ValueError(f"row_group_size and row_groups_per_file must be positive, got "
                             f"{row_group_size}, {row_groups_per_file}")
        self.directory = Path(out_dir) / split
        self.directory.mkdir(parents=True, exist_ok=True)
        for old in self.directory.glob("part-*.parquet"):
            old.unlink()  # a rebuilt split must not keep stale parts
        self.schema = schema
        self.row_group_size = row_group_size
        self.rows_per_file = row_group_size * row_groups_per_file
        self.files: list[Path] = []
        self.num_rows = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._file_rows = 0

    def write(self, table: pa.Table) -> None:
        """Buffer ``table`` (columns in any order, cast to the split's types) and flush full row groups."""
        table = table.select(self.schema.names).cast(self.schema)
        self._pending.append(table)
        self._pending_rows += table.num_rows
        while self._pending_rows >= self.row_group_size:
            self._flush(self.row_group_size)

    def _flush(self, n: int) -> None:
        merged = pa.concat_tables(self._pending)
        head, rest = merged.slice(0, n), merged.slice(n)
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows = rest.num_rows
        if self._writer is None or self._file_rows >= self.rows_per_file:
            self._open_next()
        assert self._writer is not None
        self._writer.write_table(head, row_group_size=self.row_group_size)
        self._file_rows += head.num_rows
        self.num_rows += head.num_rows

    def _open_next(self) -> None:
        if self._writer is not None:
            self._writer.close()
        path = self.directory / f"part-{len(self.files):05d}.parquet"
        self._writer = pq.ParquetWriter(path, self.schema)
        self.files.append(path)
        self._file_rows = 0

    def close(self) -> list[Path]:
        """Flush the last (partial) row group and close; an empty split still gets one empty file."""
        if self._pending_rows:
            self._flush(self._pending_rows)
        if self._writer is None:
            self._open_next()
        assert self._writer is not None
        self._writer.close()
        self._writer = None
        return self.files

    def __enter__(self) -> "SplitWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._writer is not None or self._pending_rows:
            self.close()


def write_split(table: pa.Table, out_dir: str | Path, split: str, *, row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
                row_groups_per_file: int = DEFAULT_ROW_GROUPS_PER_FILE, schema: pa.Schema | None = None) -> list[Path]:
    """Write ``table`` as ``out_dir/split/part-XXXXX.parquet`` with row groups of ``row_group_size`` rows."""
    writer = SplitWriter(out_dir, split, schema or table.schema, row_group_size=row_group_size,
                         row_groups_per_file=row_groups_per_file)
    writer.write(table)
    return writer.close()


def write_schema(schema: Schema, out_dir: str | Path) -> Path:
    """Write ``out_dir/schema.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return schema.save(out / "schema.json")

"""Validate Parquet data against a ``Schema`` and decode row groups into ``RowBlock``s.

Two levels: ``check_file_schema`` looks at a file's footer (column set and types, no data
read); ``decode_row_group`` checks the values of one row group, vectorised, and either
raises a ``DataError`` naming file/column/row group or (bad_rows="skip") keeps the bad
rows as weight-0 slots so row counts, and therefore sharding, never change.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from trainer.data.errors import DataError
from trainer.data.rows import Jagged, RowBlock
from trainer.data.schema import Schema

ID_POLICIES = ("hash", "error")
BAD_ROW_POLICIES = ("error", "skip")


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


def _is_id_type(t: pa.DataType, multi_hot: bool) -> bool:
    if multi_hot:
        return (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_integer(t.value_type)
    return pa.types.is_integer(t)


def check_file_schema(arrow_schema: pa.Schema, schema: Schema, file: str) -> None:
    """Column set and types of one file (from its footer); raises ``DataError`` on mismatch."""
    present = list(arrow_schema.names)
    expected = schema.columns()
    missing = [c for c in expected if c not in present]
    if missing:
        raise DataError(
            f"{file}: missing column(s) {missing} required by the schema (all row groups); "
            f"file has columns {present}", file=file, column=missing[0])
    extra = [c for c in present if c not in expected]
    if extra:
        raise DataError(
            f"{file}: unexpected column(s) {extra} not in the schema (all row groups); a schema that does not "
            f"match the files is a mistake — add them to schema.json or drop them from the files",
            file=file, column=extra[0])
    for name in [*schema.labels, *schema.dense]:
        t = arrow_schema.field(name).type
        if not _is_numeric(t):
            role = "label" if name in schema.labels else "dense"
            raise DataError(f"{file}: {role} column '{name}' has type {t} (all row groups); expected a numeric "
                            "(float or integer) type", file=file, column=name)
    for f in schema.sparse:
        t = arrow_schema.field(f.name).type
        if not _is_id_type(t, f.multi_hot):
            want = "list<int64>" if f.multi_hot else "an integer type (int64)"
            raise DataError(f"{file}: sparse column '{f.name}' has type {t} (all row groups); expected {want}"
                            f" (multi_hot={str(f.multi_hot).lower()} in the schema)", file=file, column=f.name)
    if schema.user_id is not None and schema.user_id not in schema.sparse_names:
        t = arrow_schema.field(schema.user_id).type
        if not pa.types.is_integer(t):
            raise DataError(f"{file}: user_id column '{schema.user_id}' has type {t} (all row groups); expected "
                            "an integer type (int64)", file=file, column=schema.user_id)


@dataclass
class _Ctx:
    file: str
    row_group: int
    bad_rows: str
    bad: np.ndarray  # [n] bool, accumulated bad-row mask

    def flag(self, column: str, mask: np.ndarray, what: str, values: np.ndarray | None = None) -> None:
        """Record rows in ``mask`` as bad: raise (error mode) or remember them (skip mode)."""
        if not mask.any():
            return
        if self.bad_rows == "error":
            rows = np.flatnonzero(mask)
            example = "" if values is None else f", e.g. value {values[rows[0]]!r}"
            raise DataError(
                f"{self.file}: column '{column}', row group {self.row_group}: {len(rows)} row(s) with {what} "
                f"(first at row {int(rows[0])} of the row group{example}); fix the data or use bad_rows='skip'",
                file=self.file, column=column, row_group=self.row_group)
        self.bad |= mask


def _numeric(col: pa.ChunkedArray | pa.Array, name: str, ctx: _Ctx, kind: str) -> np.ndarray:
    """float32 numpy copy of a numeric column; nulls and NaN/inf flagged as bad rows (then 0)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_boolean(arr.type):
        arr = arr.cast(pa.int8())
    if arr.null_count:
        nulls = arr.is_null().to_numpy(zero_copy_only=False)
        ctx.flag(name, nulls, f"null {kind} value(s)")
        arr = pc.fill_null(arr, pa.scalar(0, arr.type))
    values = arr.to_numpy(zero_copy_only=False).astype(np.float32)
    nonfinite = ~np.isfinite(values)
    if nonfinite.any():
        ctx.flag(name, nonfinite, f"NaN or infinite {kind} value(s)", values)
        values[nonfinite] = 0.0
    return values


def _ids(col: pa.ChunkedArray, name: str, num_embeddings: int, multi_hot: bool, id_policy: str,
         ctx: _Ctx) -> Jagged:
    """Jagged int64 ids of one sparse column, after null/negative/range checks."""
    arr = col.combine_chunks()
    n = len(arr)
    if multi_hot:
        if arr.null_count:
            ctx.flag(name, arr.is_null().to_numpy(zero_copy_only=False), "null id list(s)")
        lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False).astype(np.int32)
        flat = pc.list_flatten(arr)  # skips null lists; lengths above count them as 0
        row_of = np.repeat(np.arange(n), lengths)
    else:
        lengths = np.ones(n, np.int32)
        flat = arr
        row_of = None

    def rows(mask: np.ndarray) -> np.ndarray:
        if row_of is None:
            return mask
        out = np.zeros(n, bool)
        out[row_of[mask]] = True
        return out

    if flat.null_count:
        null = flat.is_null().to_numpy(zero_copy_only=False)
        ctx.flag(name, rows(null), "null id(s)")
        flat = pc.fill_null(flat, pa.scalar(0, flat.type))
    values = flat.to_numpy(zero_copy_only=False)
    if values.dtype == np.uint64 and values.size and values.max() > np.iinfo(np.int64).max:
        ctx.flag(name, rows(values > np.iinfo(np.int64).max), "id(s) larger than int64", values)
        values = np.where(values > np.iinfo(np.int64).max, 0, values)
    values = values.astype(np.int64)
    if values.size:
        negative = values < 0
        if negative.any():
            ctx.flag(name, rows(negative), "negative id(s)", values)
            values[negative] = 0
        too_big = values >= num_embeddings
        if too_big.any():
            if id_policy == "error":
                # Not a bad *row*: a table-size mismatch, always an error in this policy.
                r = np.flatnonzero(rows(too_big))
                raise DataError(
                    f"{ctx.file}: column '{name}', row group {ctx.row_group}: {int(too_big.sum())} id(s) >= "
                    f"num_embeddings={num_embeddings} (max id {int(values.max())}, first at row {int(r[0])} of the "
                    "row group); raise num_embeddings in schema.json or use id_policy='hash'",
                    file=ctx.file, column=name, row_group=ctx.row_group)
            values[too_big] %= num_embeddings
    return Jagged(values, lengths)


def decode_row_group(table: pa.Table, schema: Schema, *, file: str, row_group: int,
                     id_policy: str = "hash", bad_rows: str = "error") -> RowBlock:
    """Validate and convert one row group (already checked by ``check_file_schema``)."""
    n = table.num_rows
    ctx = _Ctx(file=file, row_group=row_group, bad_rows=bad_rows, bad=np.zeros(n, bool))
    labels = np.empty((n, len(schema.labels)), np.float32)
    for m, name in enumerate(schema.labels):
        v = _numeric(table.column(name), name, ctx, "label")
        not01 = (v != 0.0) & (v != 1.0)
        ctx.flag(name, not01, "label(s) outside {0, 1}", v)
        labels[:, m] = np.where(not01, 0.0, v)
    dense = np.empty((n, len(schema.dense)), np.float32)
    for d, name in enumerate(schema.dense):
        dense[:, d] = _numeric(table.column(name), name, ctx, "dense")
    sparse = [_ids(table.column(f.name), f.name, f.num_embeddings, f.multi_hot, id_policy, ctx)
              for f in schema.sparse]
    user_ids = None
    if schema.user_id is not None:
        col = table.column(schema.user_id).combine_chunks()
        if col.null_count:
            ctx.flag(schema.user_id, col.is_null().to_numpy(zero_copy_only=False), "null user id(s)")
            col = pc.fill_null(col, pa.scalar(0, col.type))
        user_ids = col.to_numpy(zero_copy_only=False).astype(np.int64)
    bad = ctx.bad
    if bad.any():  # skip mode: keep the slots, zero their content
        labels[bad] = 0.0
        dense[bad] = 0.0
        for k, (f, j) in enumerate(zip(schema.sparse, sparse)):
            if f.multi_hot:
                keep = np.repeat(~bad, j.lengths)
                sparse[k] = Jagged(j.values[keep], np.where(bad, 0, j.lengths).astype(np.int32))
            else:
                j.values[bad] = 0
        if user_ids is not None:
            user_ids[bad] = 0
    return RowBlock(dense=dense, labels=labels, sparse=sparse, user_ids=user_ids,
                    real=np.ones(n, bool), skipped=bad.copy())

"""Convert users' CSV/TSV files into a recbalance dataset (schema.json + Parquet splits).

Two streaming passes over the text (pyarrow.csv.open_csv, block by block), so inputs
need not fit in memory:
  1. training rows only: numeric mean/std (after optional signed log1p) and categorical
     vocabularies (frequency-ordered; values seen fewer than ``min_count`` times, unseen
     and missing values map to the reserved OOV id 0), or nothing with ``hash_size``;
  2. every split: labels to 0/1, numerics standardised (missing -> 0, i.e. the training
     mean; with ``missing_indicators`` also a 0/1 ``<name>_missing`` dense column),
     categoricals to ids, written in fixed-size row groups. Training rows are shuffled
     (seeded; through on-disk buckets when there are many) so row groups are mixed.
Embedding dim: ``embedding_dim`` for every feature (default 8), or "auto" for
min(16, 6·n^0.25) rounded up to a multiple of 4 per feature.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from trainer.datasets.csv_source import DEFAULT_NULLS, Block, TextFormat, column_names, iter_blocks
from trainer.data.errors import DataError
from trainer.datasets.features import DenseTransform, Hasher, Vocabulary, auto_embedding_dim, parse_float, splitmix64, uniform01
from trainer.data.schema import Schema, SparseFeature
from trainer.datasets.writer import DEFAULT_ROW_GROUP_SIZE, SplitWriter, arrow_schema, write_schema

ColumnRef = str | int


@dataclass
class LabelSpec:
    """Output label ``name`` (None: the source column's name) from source ``column``; 1 where the
    value is in ``positive`` (strings), or, when ``positive`` is None, the column must hold numeric 0/1."""

    name: str | None
    column: ColumnRef
    positive: list[str] | None = None


@dataclass
class ConvertSpec:
    """Everything ``convert_csv`` needs; columns are names, or 0-based indices for headerless files."""

    train: list[str | Path]
    labels: list[LabelSpec]
    dense: list[ColumnRef] = field(default_factory=list)
    categorical: list[ColumnRef] = field(default_factory=list)
    valid: list[str | Path] = field(default_factory=list)
    test: list[str | Path] = field(default_factory=list)
    valid_fraction: float = 0.0
    seed: int = 0
    delimiter: str = ","
    header: bool = True
    column_names: list[str] | None = None
    null_values: tuple[str, ...] = DEFAULT_NULLS
    hash_size: int | None = None
    min_count: int = 1
    log1p: list[ColumnRef] = field(default_factory=list)
    missing_indicators: bool = False
    embedding_dim: int | str = 8
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE
    limit: int | None = None
    shuffle_train: bool = True
    bucket_rows: int = 500_000
    block_bytes: int = 16 << 20


@dataclass
class ConvertResult:
    """What was written: the schema, rows and label rates per split, and the statistics used."""

    out_dir: Path
    schema: Schema
    rows: dict[str, int]
    label_rates: dict[str, list[float]]
    dense_stats: dict[str, tuple[float, float, int]]   # name -> (mean, std, missing count in train)
    dropped_columns: list[str]

    def summary(self) -> str:
        """One paragraph for humans."""
        rows = ", ".join(f"{s} {n:,}" for s, n in self.rows.items())
        rates = "; ".join(
            f"{s}: " + ", ".join(f"{t}={r:.4f}" for t, r in zip(self.schema.labels, rs))
            for s, rs in self.label_rates.items() if self.rows.get(s))
        return (f"Wrote {self.out_dir}: rows {rows}. Label rates {rates}. {len(self.schema.labels)} task(s), "
                f"{len(self.schema.dense)} dense and {len(self.schema.sparse)} sparse feature(s) (total embedding "
                f"rows {sum(f.num_embeddings for f in self.schema.sparse):,})"
                + (f"; dropped columns {self.dropped_columns}" if self.dropped_columns else "") + ".")


# ---- column resolution -----------------------------------------------------------------
def _resolve(ref: ColumnRef, names: list[str], what: str) -> str:
    if isinstance(ref, str) and ref in names:
        return ref
    if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
        i = int(ref)
        if 0 <= i < len(names):
            return names[i]
        raise DataError(f"{what} column index {i} out of range: the files have {len(names)} columns (0-based)",
                        column=str(ref))
    raise DataError(f"{what} column '{ref}' not found; available columns: {names}", column=str(ref))


@dataclass
class _Plan:
    names: list[str]                 # all source columns
    labels: list[tuple[LabelSpec, str]]
    dense: list[DenseTransform]
    dense_src: list[str]
    cat_src: list[str]
    include: list[str]
    dropped: list[str]


def _plan(spec: ConvertSpec, fmt: TextFormat) -> _Plan:
    if not spec.train:
        raise DataError("convert: at least one training file is required")
    if not spec.labels:
        raise DataError("convert: at least one label column is required")
    names = column_names(spec.train[0], fmt, spec.column_names)
    labels = []
    for ls in spec.labels:
        src = _resolve(ls.column, names, f"label '{ls.name or ls.column}'")
        labels.append((replace(ls, name=ls.name or src), src))
    dense_src = [_resolve(c, names, "dense") for c in spec.dense]
    cat_src = [_resolve(c, names, "categorical") for c in spec.categorical]
    log_src = {_resolve(c, names, "log1p") for c in spec.log1p}
    if not log_src <= set(dense_src):
        raise DataError(f"convert: log1p columns {sorted(log_src - set(dense_src))} are not dense columns")
    role: dict[str, str] = {}
    for r, cols in (("label", [c for _, c in labels]), ("dense", dense_src), ("categorical", cat_src)):
        for c in cols:
            if c in role and not (r == "label" and role[c] == "label"):
                raise DataError(f"convert: column '{c}' is used as both {role[c]} and {r}; a label source must not "
                                "also be a feature, and a feature has one role", column=c)
            role[c] = r
    outputs = [ls.name for ls, _ in labels] + dense_src + cat_src
    dup = sorted({n for n in outputs if outputs.count(n) > 1})
    if dup:
        raise DataError(f"convert: output column name(s) {dup} used more than once", column=dup[0])
    include = [n for n in names if n in role]
    dense = [DenseTransform(c, c in log_src) for c in dense_src]
    return _Plan(names, labels, dense, dense_src, cat_src, include, [n for n in names if n not in role])


# ---- block transforms ------------------------------------------------------------------
def _label_values(block: Block, ls: LabelSpec, src: str) -> np.ndarray:
    col = block.table.column(src).combine_chunks()
    if col.null_count:
        i = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{block.file}: label column '{src}', line {block.first_line + i}: missing label value",
                        file=block.file, column=src)
    if ls.positive is not None:
        return pc.is_in(col, value_set=pa.array(ls.positive, pa.string())).to_numpy(
            zero_copy_only=False).astype(np.float32)
    v = parse_float(col, file=block.file, column=src, first_line=block.first_line)
    bad = (v != 0.0) & (v != 1.0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{block.file}: label column '{src}', line {block.first_line + i}: value {col[i].as_py()!r} is "
                        "not 0 or 1 (give --positive-values for string labels)", file=block.file, column=src)
    return v.astype(np.float32)


def _transform(block: Block, plan: _Plan, cats: list[Vocabulary | Hasher], indicators: bool) -> pa.Table:
    cols: dict[str, object] = {}
    for ls, src in plan.labels:
        cols[ls.name] = _label_values(block, ls, src)
    for t in plan.dense:
        x = parse_float(block.table.column(t.name).combine_chunks(), file=block.file, column=t.name,
                        first_line=block.first_line)
        cols[t.name] = t.apply(x)
        if indicators:
            cols[f"{t.name}_missing"] = np.isnan(x).astype(np.float32)
    for c in cats:
        cols[c.name] = c.apply(block.table.column(c.name).combine_chunks())
    return pa.table(cols)


# ---- row streams ------------------------------------------------------------------------
def _train_blocks(spec: ConvertSpec, fmt: TextFormat, plan: _Plan) -> Iterator[tuple[Block, np.ndarray]]:
    """Blocks of the training files with each row's global index (for the seeded valid split)."""
    start = 0
    for f in spec.train:
        _check_columns(f, fmt, spec, plan)
        for block in iter_blocks(f, fmt, plan.names, plan.include, spec.limit):
            n = block.table.num_rows
            yield block, np.arange(start, start + n, dtype=np.int64)
            start += n


def _check_columns(file: str | Path, fmt: TextFormat, spec: ConvertSpec, plan: _Plan) -> None:
    names = column_names(file, fmt, spec.column_names if not fmt.header else None)
    if fmt.header and names != plan.names or not fmt.header and len(names) != len(plan.names):
        raise DataError(f"{file}: columns {names} differ from the first training file's {plan.names}", file=str(file))


def _is_valid_row(spec: ConvertSpec, index: np.ndarray) -> np.ndarray:
    if spec.valid_fraction <= 0:
        return np.zeros(len(index), bool)
    return uniform01(spec.seed, index) < spec.valid_fraction


# ---- main entry --------------------------------------------------------------------------
def convert_csv(spec: ConvertSpec, out_dir: str | Path) -> ConvertResult:
    """Build a dataset at ``out_dir`` from ``spec``; see the module docstring."""
    _check_spec(spec)
    fmt = TextFormat(spec.delimiter, spec.header, tuple(spec.null_values), spec.block_bytes)
    plan = _plan(spec, fmt)
    hashing = spec.hash_size is not None

    # pass 1: statistics from training rows only
    vocabs = [Vocabulary(c, spec.min_count) for c in plan.cat_src]
    train_rows = 0
    for block, index in _train_blocks(spec, fmt, plan):
        keep = ~_is_valid_row(spec, index)
        table = block.table.filter(pa.array(keep)) if not keep.all() else block.table
        train_rows += table.num_rows
        for t in plan.dense:
            t.stats.update(t.raw(parse_float(table.column(t.name).combine_chunks(), file=block.file, column=t.name,
                                             first_line=block.first_line)))
        if not hashing:
            for v in vocabs:
                v.update(table.column(v.name).combine_chunks())
    if train_rows == 0:
        raise DataError(f"convert: the training files {[str(f) for f in spec.train]} hold no training rows",
                        file=str(spec.train[0]))
    cats: list[Vocabulary | Hasher]
    if hashing:
        cats = [Hasher(c, int(spec.hash_size)) for c in plan.cat_src]  # type: ignore[arg-type]
    else:
        for v in vocabs:
            v.freeze()
        cats = list(vocabs)

    schema = _schema(spec, plan, cats)
    out = Path(out_dir)
    write_schema(schema, out)
    types = arrow_schema(schema)
    writers = {s: SplitWriter(out, s, types, row_group_size=spec.row_group_size) for s in ("train", "valid", "test")}
    positives = {s: np.zeros(len(schema.labels)) for s in writers}

    def emit(split: str, table: pa.Table) -> None:
        writers[split].write(table)
        for m, name in enumerate(schema.labels):
            positives[split][m] += pc.sum(table.column(name)).as_py() or 0.0

    # pass 2: transform and write
    shuffler = _Shuffler(out, spec, train_rows, lambda t: emit("train", t))
    for block, index in _train_blocks(spec, fmt, plan):
        table = _transform(block, plan, cats, spec.missing_indicators)
        to_valid = _is_valid_row(spec, index)
        if to_valid.any():
            emit("valid", table.filter(pa.array(to_valid)))
            table, index = table.filter(pa.array(~to_valid)), index[~to_valid]
        shuffler.add(table, index)
    shuffler.finish()
    for split, files in (("valid", spec.valid), ("test", spec.test)):
        for f in files:
            _check_columns(f, fmt, spec, plan)
            for block in iter_blocks(f, fmt, plan.names, plan.include, spec.limit):
                emit(split, _transform(block, plan, cats, spec.missing_indicators))
    rows = {}
    for s, w in writers.items():
        w.close()
        rows[s] = w.num_rows
    rates = {s: (positives[s] / rows[s]).tolist() if rows[s] else [0.0] * len(schema.labels) for s in rows}
    stats = {t.name: (t.stats.mean, t.stats.std, t.stats.missing) for t in plan.dense}
    return ConvertResult(out, schema, rows, rates, stats, plan.dropped)


def _check_spec(spec: ConvertSpec) -> None:
    if not 0.0 <= spec.valid_fraction < 1.0:
        raise DataError(f"convert: valid_fraction must be in [0, 1), got {spec.valid_fraction}")
    if spec.valid_fraction > 0 and spec.valid:
        raise DataError("convert: give either valid files or a valid fraction, not both")
    if spec.hash_size is not None and spec.hash_size < 2:
        raise DataError(f"convert: hash_size must be >= 2 (id 0 is reserved for missing), got {spec.hash_size}")
    if spec.min_count < 1:
        raise DataError(f"convert: min_count must be >= 1, got {spec.min_count}")
    if not (spec.embedding_dim == "auto" or isinstance(spec.embedding_dim, int) and spec.embedding_dim > 0):
        raise DataError(f"convert: embedding_dim must be a positive integer or 'auto', got {spec.embedding_dim!r}")
    if len(spec.delimiter) != 1:
        raise DataError(f"convert: delimiter must be one character, got {spec.delimiter!r} (values are stripped of "
                        "surrounding spaces, so ', ' is read as ',')")
    if spec.limit is not None and spec.limit <= 0:
        raise DataError(f"convert: limit must be positive, got {spec.limit}")


def _schema(spec: ConvertSpec, plan: _Plan, cats: Sequence[Vocabulary | Hasher]) -> Schema:
    dense = list(plan.dense_src)
    if spec.missing_indicators:
        dense += [f"{c}_missing" for c in plan.dense_src]
    sparse = []
    for c in cats:
        dim = auto_embedding_dim(c.num_embeddings) if spec.embedding_dim == "auto" else int(spec.embedding_dim)
        sparse.append(SparseFeature(c.name, c.num_embeddings, dim))
    return Schema(labels=[ls.name for ls, _ in plan.labels], dense=dense, sparse=sparse)


class _Shuffler:
    """Seeded shuffle of the training rows with bounded memory.

    Rows go to one of K buckets by a hash of their index (K = rows / bucket_rows);
    each bucket is then loaded alone, permuted and written. K = 1 stays in memory.
    """

    def __init__(self, out: Path, spec: ConvertSpec, rows: int, sink: Callable[[pa.Table], None]) -> None:
        self.sink = sink
        self.spec = spec
        self.k = max(1, math.ceil(rows / spec.bucket_rows)) if spec.shuffle_train else 0
        self.tmp = out / ".shuffle-tmp"
        self.memory: list[pa.Table] = []
        self.writers: list[pq.ParquetWriter] = []

    def add(self, table: pa.Table, index: np.ndarray) -> None:
        if self.k == 0:
            self.sink(table)
        elif self.k == 1:
            self.memory.append(table)
        else:
            if not self.writers:
                self.tmp.mkdir(parents=True, exist_ok=True)
                self.writers = [pq.ParquetWriter(self.tmp / f"bucket-{b}.parquet", table.schema) for b in range(self.k)]
            bucket = (splitmix64(self.spec.seed + 1, index) % np.uint64(self.k)).astype(np.int64)
            for b in range(self.k):
                part = table.filter(pa.array(bucket == b))
                if part.num_rows:
                    self.writers[b].write_table(part)

    def _emit_permuted(self, table: pa.Table, bucket: int) -> None:
        perm = np.random.default_rng([self.spec.seed, 7, bucket]).permutation(table.num_rows)
        self.sink(table.take(pa.array(perm)))

    def finish(self) -> None:
        if self.k == 1 and self.memory:
            self._emit_permuted(pa.concat_tables(self.memory), 0)
            self.memory = []
        elif self.writers:
            for w in self.writers:
                w.close()
            for b in range(self.k):
                self._emit_permuted(pq.read_table(self.tmp / f"bucket-{b}.parquet"), b)
            shutil.rmtree(self.tmp, ignore_errors=True)

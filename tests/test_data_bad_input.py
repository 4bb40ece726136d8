"""Bad data: every error names the file, the column and the row group; skip mode counts and zeroes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from trainer.data import DataError, ParquetReader, Schema, SparseFeature
from trainer.datasets.writer import write_schema

SCHEMA = Schema(labels=["click"], dense=["price"], sparse=[SparseFeature("item", 10, 4)])
ROWS, RG = 40, 10


def _columns() -> dict[str, pa.Array]:
    return {"click": pa.array(np.arange(ROWS) % 2, pa.float32()),
            "price": pa.array(np.linspace(0, 1, ROWS), pa.float32()),
            "item": pa.array(np.arange(ROWS) % 10, pa.int64())}


def _write(root: Path, columns: dict[str, pa.Array], name: str = "part-00000.parquet",
           schema: Schema = SCHEMA) -> Path:
    write_schema(schema, root)
    (root / "train").mkdir(parents=True, exist_ok=True)
    path = root / "train" / name
    pq.write_table(pa.table(columns), path, row_group_size=RG)
    return path


def _read_all(root: Path, **kw) -> tuple[ParquetReader, list]:
    args = dict(local_batch_size=8, rank=0, world_size=1, shuffle=False, seed=0, drop_last=False)
    args.update(kw)
    r = ParquetReader(root, kw.pop("schema", SCHEMA), "train", **{k: v for k, v in args.items() if k != "schema"})
    return r, list(r.epoch(0))


def _with(column: str, values: list, type_: pa.DataType) -> dict[str, pa.Array]:
    cols = _columns()
    cols[column] = pa.array(values, type_)
    return cols


def _bad_at_row(column: str, row: int, bad_value, type_: pa.DataType) -> dict[str, pa.Array]:
    values = _columns()[column].to_pylist()
    values[row] = bad_value
    return _with(column, values, type_)


def _expect(root: Path, match: str, column: str, row_group: int | None, file: Path, **kw) -> DataError:
    with pytest.raises(DataError, match=match) as ei:
        _read_all(root, **kw)
    err = ei.value
    assert str(file) in str(err) and err.file == str(file)
    assert f"'{column}'" in str(err) and err.column == column
    assert err.row_group == row_group
    if row_group is not None:
        assert f"row group {row_group}" in str(err)
    else:
        assert "all row groups" in str(err)
    return err


def test_missing_column(tmp_path: Path) -> None:
    cols = _columns()
    del cols["price"]
    f = _write(tmp_path, cols)
    _expect(tmp_path, r"missing column\(s\) \['price'\]", "price", None, f)


def test_extra_column(tmp_path: Path) -> None:
    cols = _columns()
    cols["surprise"] = pa.array(np.zeros(ROWS))
    f = _write(tmp_path, cols)
    _expect(tmp_path, r"unexpected column\(s\) \['surprise'\]", "surprise", None, f)


def test_wrong_dense_type(tmp_path: Path) -> None:
    f = _write(tmp_path, _with("price", [str(i) for i in range(ROWS)], pa.string()))
    _expect(tmp_path, "dense column 'price' has type string.*expected a numeric", "price", None, f)


def test_wrong_id_type(tmp_path: Path) -> None:
    f = _write(tmp_path, _with("item", [float(i % 10) for i in range(ROWS)], pa.float64()))
    _expect(tmp_path, "sparse column 'item' has type double.*integer", "item", None, f)


@pytest.mark.parametrize("column, row, value, type_, what", [
    ("click", 13, None, pa.float32(), "null label"),
    ("click", 13, float("nan"), pa.float32(), "NaN or infinite label"),
    ("click", 13, 2.0, pa.float32(), r"label\(s\) outside \{0, 1\}"),
    ("price", 25, float("inf"), pa.float32(), "NaN or infinite dense"),
    ("price", 25, None, pa.float32(), "null dense"),
    ("item", 31, -3, pa.int64(), "negative id"),
    ("item", 31, None, pa.int64(), "null id"),
])
def test_bad_values(tmp_path: Path, column: str, row: int, value, type_, what: str) -> None:
    f = _write(tmp_path, _bad_at_row(column, row, value, type_))
    err = _expect(tmp_path, what, column, row // RG, f)
    assert f"first at row {row % RG} of the row group" in str(err)


def test_id_out_of_range_error_vs_hash(tmp_path: Path) -> None:
    f = _write(tmp_path, _bad_at_row("item", 22, 1234, pa.int64()))
    _expect(tmp_path, r"id\(s\) >= num_embeddings=10 \(max id 1234", "item", 2, f, id_policy="error")
    r, batches = _read_all(tmp_path, id_policy="hash")
    values = torch.cat([b.sparse["item"].values() for b in batches])
    assert int(values[22]) == 1234 % 10 and int(values.max()) < 10
    assert r.skipped_rows == 0


def test_skip_mode_counts_and_zeroes(tmp_path: Path) -> None:
    cols = _columns()
    click = cols["click"].to_pylist()
    click[3] = None
    click[17] = 2.0
    price = cols["price"].to_pylist()
    price[17] = float("nan")  # same row twice: counted once
    price[30] = float("-inf")
    item = cols["item"].to_pylist()
    item[39] = -1
    _write(tmp_path, {"click": pa.array(click, pa.float32()), "price": pa.array(price, pa.float32()),
                      "item": pa.array(item, pa.int64())})
    r, batches = _read_all(tmp_path, bad_rows="skip")
    w = torch.cat([b.weights for b in batches])[:ROWS]
    bad = [3, 17, 30, 39]
    assert r.skipped_rows == len(bad) and r.rows_read == ROWS
    assert torch.all(w[bad] == 0) and float(w.sum()) == ROWS - len(bad)
    labels = torch.cat([b.labels for b in batches], dim=1)[:, :ROWS]
    dense = torch.cat([b.dense for b in batches])[:ROWS]
    item_ids = torch.cat([b.sparse["item"].values() for b in batches])[:ROWS]
    assert torch.all(labels[:, bad] == 0) and torch.all(dense[bad] == 0) and torch.all(item_ids[bad] == 0)
    assert torch.isfinite(dense).all()


def test_skip_mode_multi_hot(tmp_path: Path) -> None:
    schema = Schema(labels=["click"], dense=[], sparse=[SparseFeature("hist", 5, 4, multi_hot=True)])
    hist = [[1, 2], [3], [-1, 4], None, [], [2, None]] + [[0]] * 4
    write_schema(schema, tmp_path)
    (tmp_path / "train").mkdir()
    pq.write_table(pa.table({"click": pa.array([0.0] * 10, pa.float32()),
                             "hist": pa.array(hist, pa.list_(pa.int64()))}), tmp_path / "train" / "a.parquet")
    r = ParquetReader(tmp_path, schema, "train", 10, 0, 1, shuffle=False, seed=0, drop_last=False, bad_rows="skip")
    (b,) = list(r.epoch(0))
    assert r.skipped_rows == 3
    assert b.weights.tolist() == [1, 1, 0, 0, 1, 0, 1, 1, 1, 1]
    assert b.sparse["hist"].lengths().tolist() == [2, 1, 0, 0, 0, 0, 1, 1, 1, 1]
    assert b.sparse["hist"].values().tolist() == [1, 2, 3, 0, 0, 0, 0]


def test_empty_file_fine_if_others_have_rows(tmp_path: Path) -> None:
    _write(tmp_path, _columns())
    _write(tmp_path, {k: v.slice(0, 0) for k, v in _columns().items()}, name="part-00001.parquet")
    r, batches = _read_all(tmp_path)
    assert r.rows_read == ROWS


def test_all_files_empty(tmp_path: Path) -> None:
    _write(tmp_path, {k: v.slice(0, 0) for k, v in _columns().items()})
    with pytest.raises(DataError, match=r"split 'train' has no rows"):
        _read_all(tmp_path)


def test_truncated_file(tmp_path: Path) -> None:
    _write(tmp_path, _columns())
    f = _write(tmp_path, _columns(), name="part-00001.parquet")
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="not a readable Parquet file") as ei:
        _read_all(tmp_path)
    assert str(f) in str(ei.value) and ei.value.file == str(f)


def test_corrupt_data_page_names_row_group(tmp_path: Path) -> None:
    f = _write(tmp_path, _columns())
    meta = pq.ParquetFile(f).metadata
    col = meta.row_group(1).column(1)  # price, row group 1
    start = col.data_page_offset
    data = bytearray(f.read_bytes())
    data[start: start + col.total_compressed_size] = b"\xff" * col.total_compressed_size
    f.write_bytes(bytes(data))
    with pytest.raises(DataError) as ei:
        _read_all(tmp_path)
    assert str(f) in str(ei.value) and ei.value.row_group == 1 and "column 'price', row group 1" in str(ei.value)
    assert ei.value.column == "price"


def test_error_from_prefetch_thread_keeps_location(tmp_path: Path) -> None:
    f = _write(tmp_path, _bad_at_row("click", 35, 7.0, pa.float32()))
    err = _expect(tmp_path, "outside", "click", 3, f, prefetch=3)
    assert isinstance(err, ValueError)


def test_boolean_and_integer_columns_accepted(tmp_path: Path) -> None:
    cols = _columns()
    cols["click"] = pa.array([bool(i % 2) for i in range(ROWS)])
    cols["price"] = pa.array([None if i == 5 else i for i in range(ROWS)], pa.int32())
    cols["item"] = pa.array(np.arange(ROWS) % 10, pa.uint16())
    _write(tmp_path, cols)
    r, batches = _read_all(tmp_path, bad_rows="skip")
    labels = torch.cat([b.labels for b in batches], dim=1)[0, :ROWS]
    assert labels.tolist() == [float(i % 2) if i != 5 else 0.0 for i in range(ROWS)]
    assert r.skipped_rows == 1


def test_data_error_survives_pickling() -> None:
    import pickle
    err = pickle.loads(pickle.dumps(DataError("bad", file="f.parquet", column="c", row_group=2)))
    assert (str(err), err.file, err.column, err.row_group) == ("bad", "f.parquet", "c", 2)

"""ParquetReader: sharding, determinism, resume, TrainStream, eval padding, prefetch errors."""

from __future__ import annotations

import gc
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from trainer.data import Batch, DataError, ParquetReader, Schema, SparseFeature, TrainStream
from trainer.datasets.writer import arrow_schema, write_schema

SCHEMA = Schema(labels=["click", "buy"], dense=["d0", "d1"],
                sparse=[SparseFeature("rid", 1_000_000, 4), SparseFeature("cat", 7, 4),
                        SparseFeature("hist", 50, 4, multi_hot=True)],
                user_id="uid", personal_features=["rid"])


def _table(start: int, n: int) -> pa.Table:
    rid = np.arange(start, start + n, dtype=np.int64)
    hist = pa.array([list(range(r % 4)) for r in rid], pa.list_(pa.int64()))
    return pa.table({
        "click": (rid % 2).astype(np.float32), "buy": (rid % 3 == 0).astype(np.float32),
        "d0": rid.astype(np.float32), "d1": np.ones(n, np.float32),
        "rid": rid, "cat": rid % 7, "hist": hist, "uid": rid // 10}, schema=arrow_schema(SCHEMA))


def make_dataset(root: Path, split: str = "train", sizes: tuple[int, ...] = (1000, 700, 0, 333),
                 row_group_size: int = 100) -> int:
    """Files with the given row counts (one empty); rid = global row number."""
    write_schema(SCHEMA, root)
    (root / split).mkdir(parents=True, exist_ok=True)
    start = 0
    for i, n in enumerate(sizes):
        pq.write_table(_table(start, n), root / split / f"part-{i:05d}.parquet", row_group_size=row_group_size)
        start += n
    return start


def reader(root: Path, **kw) -> ParquetReader:
    args = dict(split="train", local_batch_size=64, rank=0, world_size=1, shuffle=True, seed=3, drop_last=True)
    args.update(kw)
    return ParquetReader(root, SCHEMA, **args)


def ids(batch: Batch) -> np.ndarray:
    """Row ids of the real (weight 1) rows of a batch."""
    rid = batch.sparse["rid"].values().numpy()
    return rid[batch.weights.numpy() > 0]


def test_batch_layout(tmp_path: Path) -> None:
    make_dataset(tmp_path)
    r = reader(tmp_path, shuffle=False, prefetch=0)
    b = next(iter(r.epoch(0)))
    assert len(b) == 64 and b.dense.shape == (64, 2) and b.dense.dtype == torch.float32
    assert b.labels.shape == (2, 64) and b.weights.dtype == torch.float32
    assert b.sparse.keys() == ["rid", "cat", "hist"] and b.sparse.values().dtype == torch.int64
    rid = b.sparse["rid"].values()
    assert torch.equal(rid, torch.arange(64))
    assert torch.equal(b.labels[0], (rid % 2).float()) and torch.equal(b.dense[:, 0], rid.float())
    assert torch.equal(b.sparse["hist"].lengths(), (rid % 4).int())
    assert torch.equal(b.user_ids, rid // 10)
    moved = b.to(torch.device("cpu"))
    assert torch.equal(moved.dense, b.dense) and moved.sparse.keys() == b.sparse.keys()


def test_two_ranks_disjoint_and_complete(tmp_path: Path) -> None:
    total = make_dataset(tmp_path)
    for shuffle in (False, True):
        readers = [reader(tmp_path, rank=r, world_size=2, drop_last=False, shuffle=shuffle) for r in (0, 1)]
        assert readers[0].batches_per_epoch == readers[1].batches_per_epoch
        seen = []
        for r in readers:
            batches = list(r.epoch(1))
            assert len(batches) == r.batches_per_epoch
            seen.append(np.concatenate([ids(b) for b in batches]))
        assert not set(seen[0]) & set(seen[1])
        both = np.concatenate(seen)
        assert len(both) == total and set(both) == set(range(total))


def test_drop_last_same_steps_on_every_rank(tmp_path: Path) -> None:
    make_dataset(tmp_path)
    for shuffle in (False, True):
        readers = [reader(tmp_path, rank=r, world_size=3, shuffle=shuffle, local_batch_size=50) for r in range(3)]
        n = readers[0].batches_per_epoch
        assert all(r.batches_per_epoch == n for r in readers) and n > 0
        for epoch in range(3):
            for r in readers:
                batches = list(r.epoch(epoch))
                assert len(batches) == n and all(float(b.weights.sum()) == 50 for b in batches)


def test_deterministic_per_seed_and_epoch(tmp_path: Path) -> None:
    make_dataset(tmp_path)
    a = [ids(b) for b in reader(tmp_path).epoch(2)]
    b = [ids(b) for b in reader(tmp_path, prefetch=0).epoch(2)]
    c = [ids(b) for b in reader(tmp_path).epoch(3)]
    d = [ids(b) for b in reader(tmp_path, seed=4).epoch(2)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)
    assert not np.array_equal(np.concatenate(a), np.concatenate(c))
    assert not np.array_equal(np.concatenate(a), np.concatenate(d))
    plain = np.concatenate([ids(b) for b in reader(tmp_path, shuffle=False).epoch(0)])
    assert np.array_equal(plain, np.arange(len(plain)))


@pytest.mark.parametrize("drop_last", [True, False])
def test_start_batch_resume_equals_full_epoch(tmp_path: Path, drop_last: bool) -> None:
    make_dataset(tmp_path)
    r = reader(tmp_path, drop_last=drop_last, world_size=2, rank=1, local_batch_size=48)
    full = list(r.epoch(5))
    for start in (0, 1, 4, len(full) - 1, len(full)):
        rest = list(r.epoch(5, start_batch=start))
        assert len(rest) == len(full) - start
        for x, y in zip(full[start:], rest):
            assert torch.equal(x.sparse.values(), y.sparse.values()) and torch.equal(x.weights, y.weights)
            assert torch.equal(x.dense, y.dense) and torch.equal(x.labels, y.labels)


def test_start_batch_skips_row_groups_without_reading(tmp_path: Path, monkeypatch) -> None:
    make_dataset(tmp_path)
    r = reader(tmp_path, shuffle=False, local_batch_size=100, prefetch=0)
    calls = []
    original = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, *a, **k: calls.append(i) or original(self, i, *a, **k))
    next(iter(r.epoch(0, start_batch=5)))
    assert calls == [5]


def test_train_stream_state_round_trip(tmp_path: Path) -> None:
    make_dataset(tmp_path)
    r = reader(tmp_path, local_batch_size=128)
    per_epoch = r.batches_per_epoch
    reference = TrainStream(reader(tmp_path, local_batch_size=128))
    expected = [ids(next(reference)) for _ in range(3 * per_epoch + 2)]
    for cut in (0, 3, per_epoch - 1, per_epoch, 2 * per_epoch + 1):
        s = TrainStream(r)
        got = [ids(next(s)) for _ in range(cut)]
        state = s.state_dict()
        s.close()
        assert state == {"epoch": cut // per_epoch, "batch": cut % per_epoch}
        resumed = TrainStream(reader(tmp_path, local_batch_size=128))
        resumed.load_state_dict(dict(state))
        got += [ids(next(resumed)) for _ in range(len(expected) - cut)]
        resumed.close()
        assert all(np.array_equal(x, y) for x, y in zip(expected, got))
    reference.close()


def test_eval_padding_every_row_once(tmp_path: Path) -> None:
    total = make_dataset(tmp_path, split="valid", sizes=(250, 30))
    readers = [reader(tmp_path, split="valid", rank=k, world_size=2, drop_last=False, shuffle=False,
                      local_batch_size=64) for k in (0, 1)]
    n = readers[0].batches_per_epoch
    seen = []
    for r in readers:
        batches = list(r.epoch(0))
        assert len(batches) == n and all(len(b) == 64 for b in batches)
        for b in batches:
            pad = b.weights == 0
            assert torch.all(b.labels[:, pad] == 0) and torch.all(b.dense[pad] == 0)
            assert torch.all(b.sparse["rid"].values()[pad] == 0) and torch.all(b.sparse["hist"].lengths()[pad] == 0)
            seen.append(ids(b))
        assert r.rows_read == sum(float(b.weights.sum()) for b in batches)
    rows = np.concatenate(seen)
    assert len(rows) == total and set(rows) == set(range(total))
    assert readers[1].rows_read < readers[0].rows_read  # rank 1 got fewer rows and padded


def test_fewer_row_groups_than_ranks(tmp_path: Path) -> None:
    make_dataset(tmp_path, sizes=(150,), row_group_size=100)
    with pytest.raises(DataError, match=r"split 'train' has 2 non-empty row group\(s\) but world_size=3.*smaller row"):
        reader(tmp_path, world_size=3)


def test_prefetch_error_propagates_with_message(tmp_path: Path, monkeypatch) -> None:
    make_dataset(tmp_path)
    r = reader(tmp_path, shuffle=False, local_batch_size=100)

    def boom(self, unit, epoch, cache):  # noqa: ANN001
        if unit.index == 2:
            raise RuntimeError("disk on fire in unit 2")
        return original(self, unit, epoch, cache)

    original = ParquetReader._read_unit
    monkeypatch.setattr(ParquetReader, "_read_unit", boom)
    it = r.epoch(0)
    assert len(next(it)) == 100 and len(next(it)) == 100
    with pytest.raises(RuntimeError, match="disk on fire in unit 2"):
        next(it)


def test_prefetch_thread_stops_on_close_and_gc(tmp_path: Path) -> None:
    make_dataset(tmp_path)
    r = reader(tmp_path, local_batch_size=8, prefetch=2)
    before = threading.active_count()
    it = r.epoch(0)
    next(it)
    it.close()
    it2 = r.epoch(1)
    next(it2)
    del it2
    gc.collect()
    for _ in range(100):
        if threading.active_count() <= before:
            break
        threading.Event().wait(0.02)
    assert threading.active_count() <= before


def test_bad_arguments(tmp_path: Path) -> None:
    make_dataset(tmp_path)
    with pytest.raises(ValueError, match="id_policy must be one of"):
        reader(tmp_path, id_policy="clip")
    with pytest.raises(ValueError, match="bad_rows must be one of"):
        reader(tmp_path, bad_rows="ignore")
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\)"):
        reader(tmp_path, rank=2, world_size=2)
    with pytest.raises(DataError, match="split 'test' not found"):
        reader(tmp_path, split="test")

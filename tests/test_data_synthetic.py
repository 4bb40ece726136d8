"""Synthetic data: the relation knob moves task correlation; cascade holds; readable by the reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from trainer.data import ParquetReader, Schema
from trainer.datasets.synthetic import make_synthetic, task_vectors


def _labels(root: Path, split: str = "train") -> np.ndarray:
    t = pq.read_table(root / split)
    return np.stack([t.column("click").to_numpy(), t.column("conversion").to_numpy()])


def _phi(y: np.ndarray) -> float:
    return float(np.corrcoef(y[0], y[1])[0, 1])


def test_task_vectors_have_requested_cosine() -> None:
    rng = np.random.default_rng(0)
    for r in (-1.0, -0.3, 0.0, 0.7, 1.0):
        w = task_vectors(3, 20, r, 2.0, rng)
        cos = w @ w.T / np.outer(np.linalg.norm(w, axis=1), np.linalg.norm(w, axis=1))
        assert cos[0, 1] == pytest.approx(r, abs=1e-9) and cos[0, 2] == pytest.approx(r, abs=1e-9)


def test_relation_changes_label_correlation(tmp_path: Path) -> None:
    corr = {}
    for r in (1.0, 0.0, -1.0):
        info = make_synthetic(tmp_path / str(r), 20_000, relation=r, seed=0, row_group_size=1024)
        corr[r] = _phi(_labels(tmp_path / str(r)))
        assert corr[r] == pytest.approx(info.label_correlation, abs=1e-6)
        assert info.task_cosines[0, 1] == pytest.approx(r, abs=1e-9)
    assert corr[1.0] > 0.15 and corr[-1.0] < -0.08 and abs(corr[0.0]) < 0.05
    assert corr[1.0] > corr[0.0] > corr[-1.0]


def test_cascade_and_base_rates(tmp_path: Path) -> None:
    info = make_synthetic(tmp_path, 10_000, cascade=True, seed=1, row_group_size=512)
    y = _labels(tmp_path)
    assert np.all(y[1] <= y[0])  # conversion only after a click
    assert 0.1 < y[0].mean() < 0.3
    assert 0.15 < y[1][y[0] == 1].mean() < 0.45
    assert info.rows == {"train": 8000, "valid": 1000, "test": 1000}


def test_schema_and_reader_round_trip(tmp_path: Path) -> None:
    info = make_synthetic(tmp_path, 3000, num_tasks=3, history_length=4, seed=2, row_group_size=256)
    schema = Schema.load(tmp_path)
    assert schema == info.schema
    assert schema.labels == ["click", "conversion", "task_2"]
    assert schema.user_id == "user_id" and schema.personal_features == ["user_id"]
    assert schema.feature("history").multi_hot
    r = ParquetReader(tmp_path, schema, "valid", 100, 0, 1, shuffle=False, seed=0, drop_last=False,
                      id_policy="error")
    batches = list(r.epoch(0))
    assert sum(float(b.weights.sum()) for b in batches) == 300 and r.skipped_rows == 0
    assert batches[0].labels.shape == (3, 100) and batches[0].user_ids is not None


def test_deterministic(tmp_path: Path) -> None:
    make_synthetic(tmp_path / "a", 2000, seed=5, row_group_size=256)
    make_synthetic(tmp_path / "b", 2000, seed=5, row_group_size=256)
    assert pq.read_table(tmp_path / "a" / "train").equals(pq.read_table(tmp_path / "b" / "train"))


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"relation must be in \[-1, 1\]"):
        make_synthetic(tmp_path, 100, relation=1.5)
    with pytest.raises(ValueError, match="cascade needs num_tasks >= 2"):
        make_synthetic(tmp_path, 100, num_tasks=1, cascade=True)

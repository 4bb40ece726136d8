"""CSV/TSV conversion: Criteo-like TSV via the CLI preset, CSV with a header, train-only statistics."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainer.data import DataError, ParquetReader, Schema
from trainer.datasets.cli import add_data_commands, run_data_command
from trainer.datasets.convert import ConvertSpec, LabelSpec, convert_csv
from trainer.datasets.features import fnv1a64


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="recbalance")
    add_data_commands(parser.add_subparsers(dest="command"))
    return run_data_command(parser.parse_args(["data", *argv]))


def _criteo_rows(n: int, seed: int) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        label = str(int(rng.random() < 0.3))
        ints = ["" if rng.random() < 0.2 else str(int(rng.integers(-2, 500))) for _ in range(13)]
        cats = ["" if rng.random() < 0.1 else f"{int(rng.integers(0, 6)):08x}" for _ in range(26)]
        rows.append([label, *ints, *cats])
    return rows


def _write(path: Path, rows: list[list[str]], sep: str, header: list[str] | None = None) -> Path:
    lines = ([sep.join(header)] if header else []) + [sep.join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _signed_log1p(x: float) -> float:
    return math.copysign(math.log1p(abs(x)), x)


def test_criteo_preset(tmp_path: Path, capsys) -> None:
    train_rows, test_rows = _criteo_rows(120, 0), _criteo_rows(40, 1)
    train = _write(tmp_path / "train.tsv", train_rows, "\t")
    test = _write(tmp_path / "test.tsv", test_rows, "\t")
    out = tmp_path / "criteo"
    assert _cli("convert", "--preset", "criteo", "--train", str(train), "--test", str(test), "--output", str(out),
                "--row-group-size", "16", "--hash-size", "1000") == 0
    summary = capsys.readouterr().out
    assert "rows train 120" in summary and "test 40" in summary and "13 dense and 26 sparse" in summary
    schema = Schema.load(out)
    assert schema.labels == ["label"] and schema.dense == [f"I{i}" for i in range(1, 14)]
    assert schema.sparse_names == [f"C{i}" for i in range(1, 27)]
    assert all(f.num_embeddings == 1000 and f.embedding_dim == 8 for f in schema.sparse)

    # dense: signed log1p then standardised with TRAIN mean/std; missing -> 0
    raw = [_signed_log1p(float(r[1])) for r in train_rows if r[1] != ""]
    mean, std = float(np.mean(raw)), float(np.std(raw))
    t = pq.read_table(out / "test")
    got = t.column("I1").to_numpy()
    want = [0.0 if r[1] == "" else (_signed_log1p(float(r[1])) - mean) / std for r in test_rows]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # the test split keeps file order
    # categorical: missing -> 0, others hashed into 1..999, stable
    c1 = t.column("C1").to_numpy()
    for r, v in zip(test_rows, c1):
        if r[14] == "":
            assert v == 0
        else:
            assert v == 1 + int(fnv1a64(pa.array([r[14]]))[0] % 999)
    assert t.column("label").to_pylist() == [float(r[0]) for r in test_rows]
    assert pq.ParquetFile(next((out / "train").glob("*.parquet"))).metadata.row_group(0).num_rows == 16
    r = ParquetReader(out, schema, "train", 32, 0, 2, shuffle=True, seed=0, drop_last=True, id_policy="error")
    assert len(list(r.epoch(0))) == r.batches_per_epoch


def test_criteo_vocabulary_mode_oov(tmp_path: Path) -> None:
    train_rows = _criteo_rows(60, 2)
    test_rows = [list(r) for r in _criteo_rows(5, 3)]
    test_rows[0][14] = "deadbeef"  # unseen in train
    out = tmp_path / "out"
    assert _cli("convert", "--preset", "criteo", "--hash-size", "0", "--min-count", "2", "--no-shuffle",
                "--train", str(_write(tmp_path / "a.tsv", train_rows, "\t")),
                "--test", str(_write(tmp_path / "b.tsv", test_rows, "\t")), "--output", str(out)) == 0
    schema = Schema.load(out)
    counts: dict[str, int] = {}
    for r in train_rows:
        if r[14]:
            counts[r[14]] = counts.get(r[14], 0) + 1
    kept = sorted((v for v, c in counts.items() if c >= 2), key=lambda v: (-counts[v], v))
    assert schema.feature("C1").num_embeddings == len(kept) + 1
    train_c1 = pq.read_table(out / "train").column("C1").to_pylist()
    assert train_c1 == [kept.index(r[14]) + 1 if r[14] in kept else 0 for r in train_rows]
    assert pq.read_table(out / "test").column("C1").to_pylist()[0] == 0


HEADER = ["clicked", "age", "city", "visits", "bought"]


def _csv_spec(tmp_path: Path, **kw) -> ConvertSpec:
    train = _write(tmp_path / "train.csv", [["yes", "20", "paris", "1", "0"], ["no", "30", "rome", "", "1"],
                                            ["no", "40", "paris", "100", "0"], ["yes", "", "oslo", "3", "1"]],
                   ",", HEADER)
    valid = _write(tmp_path / "valid.csv", [["no", "100", "lima", "1", "0"], ["yes", " 30 ", " paris ", "2", "1"]],
                   ",", HEADER)
    args = dict(train=[train], valid=[valid], labels=[LabelSpec("click", "clicked", ["yes"]), LabelSpec(None, 4)],
                dense=["age", 3], categorical=["city"], log1p=["visits"], missing_indicators=True, shuffle_train=False)
    args.update(kw)
    return ConvertSpec(**args)


def test_csv_with_header_train_only_statistics(tmp_path: Path) -> None:
    res = convert_csv(_csv_spec(tmp_path), tmp_path / "out")
    schema = res.schema
    assert schema.labels == ["click", "bought"]
    assert schema.dense == ["age", "visits", "age_missing", "visits_missing"]
    assert res.rows == {"train": 4, "valid": 2, "test": 0}
    mean, std = 30.0, float(np.std([20, 30, 40]))
    assert res.dense_stats["age"] == pytest.approx((mean, std, 1))
    valid = pq.read_table(tmp_path / "out" / "valid").to_pydict()
    assert valid["age"] == pytest.approx([(100 - mean) / std, 0.0])  # valid's 100 did not move the statistics
    assert valid["click"] == [0.0, 1.0] and valid["bought"] == [0.0, 1.0]
    assert valid["city"] == [0, 1]  # lima unseen -> OOV 0; paris most frequent -> 1 (values are trimmed)
    train = pq.read_table(tmp_path / "out" / "train").to_pydict()
    assert train["age"][3] == 0.0 and train["age_missing"] == [0.0, 0.0, 0.0, 1.0]
    logv = [math.log1p(v) for v in (1, 100, 3)]
    assert train["visits"][1] == 0.0
    assert train["visits"][2] == pytest.approx((math.log1p(100) - np.mean(logv)) / np.std(logv), rel=1e-5)
    assert schema.feature("city").num_embeddings == 4  # paris, oslo, rome + OOV
    assert res.label_rates["train"] == [0.5, 0.5]


def test_valid_fraction_and_bucketed_shuffle(tmp_path: Path) -> None:
    rows = [[str(i % 2), str(i), f"c{i % 5}"] for i in range(500)]
    f = _write(tmp_path / "big.csv", rows, ",", ["y", "x", "c"])
    spec = dict(train=[f], labels=[LabelSpec(None, "y")], dense=["x"], categorical=["c"], valid_fraction=0.2, seed=3,
                row_group_size=64)
    a = convert_csv(ConvertSpec(**spec), tmp_path / "a")
    b = convert_csv(ConvertSpec(**spec, bucket_rows=100), tmp_path / "b")  # 4 on-disk buckets
    assert a.rows == b.rows and a.rows["train"] + a.rows["valid"] == 500 and 60 < a.rows["valid"] < 140
    ta, tb = (pq.read_table(tmp_path / d / "train") for d in ("a", "b"))
    assert sorted(ta.column("x").to_pylist()) == sorted(tb.column("x").to_pylist())
    x = np.array(ta.column("x").to_pylist())
    assert not np.all(np.diff(x) > 0)  # shuffled
    assert not (tmp_path / "b" / ".shuffle-tmp").exists()


@pytest.mark.parametrize("kw, match", [
    (dict(dense=["agee"]), r"dense column 'agee' not found; available columns: \['clicked'"),
    (dict(categorical=["city", "clicked"]), "'clicked' is used as both label and categorical"),
    (dict(labels=[LabelSpec(None, "bought")], dense=["bought"], log1p=[]), "used as both label and dense"),
    (dict(dense=[9]), "index 9 out of range"),
])
def test_spec_errors(tmp_path: Path, kw: dict, match: str) -> None:
    with pytest.raises(DataError, match=match):
        convert_csv(_csv_spec(tmp_path, **kw), tmp_path / "out")


def test_bad_values_name_file_column_line(tmp_path: Path) -> None:
    f = _write(tmp_path / "t.csv", [["1", "5"], ["2", "6"]], ",", ["y", "x"])
    with pytest.raises(DataError, match=r"t.csv: label column 'y', line 3: value '2' is not 0 or 1") as ei:
        convert_csv(ConvertSpec(train=[f], labels=[LabelSpec(None, "y")], dense=["x"]), tmp_path / "o")
    assert ei.value.file == str(f) and ei.value.column == "y"
    g = _write(tmp_path / "u.csv", [["1", "5"], ["0", "abc"]], ",", ["y", "x"])
    with pytest.raises(DataError, match=r"u.csv: column 'x', line 3: 'abc' is not a number"):
        convert_csv(ConvertSpec(train=[g], labels=[LabelSpec(None, "y")], dense=["x"]), tmp_path / "o")
    h = _write(tmp_path / "v.csv", [["1", "5"], ["", "6"]], ",", ["y", "x"])
    with pytest.raises(DataError, match=r"v.csv: label column 'y', line 3: missing label"):
        convert_csv(ConvertSpec(train=[h], labels=[LabelSpec(None, "y")], dense=["x"]), tmp_path / "o")


def test_cli_reports_errors(tmp_path: Path, capsys) -> None:
    assert _cli("convert", "--train", str(tmp_path / "missing.csv"), "--labels", "y", "--output",
                str(tmp_path / "o")) == 2
    assert "missing.csv" in capsys.readouterr().err


def test_cli_synthetic(tmp_path: Path, capsys) -> None:
    assert _cli("synthetic", "--output", str(tmp_path / "s"), "--rows", "1500", "--relation", "-0.5",
                "--cascade", "--row-group-size", "128") == 0
    out = capsys.readouterr().out
    assert "rows train 1,200, valid 150, test 150" in out and "click=" in out and "relation -0.50" in out
    assert _cli("check", str(tmp_path / "s")) == 0
    assert "train: 1,200 rows" in capsys.readouterr().out

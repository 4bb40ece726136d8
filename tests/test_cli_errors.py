"""Errors that keep their cause: a rank's multi-line error reaches the user whole and once;
data problems that can be found before the ranks start are; `data check` and `bench
compare` exit codes a pipeline can gate on."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.test_cli_train import recbalance, tiny_overrides
from trainer.run.cli import main


def corrupt_column_pages(file: Path, column: int) -> None:
    """Overwrite the data pages of `column` in every row group (the footer stays readable)."""
    meta = pq.ParquetFile(file).metadata
    data = bytearray(file.read_bytes())
    for rg in range(meta.num_row_groups):
        chunk = meta.row_group(rg).column(column)
        start = chunk.data_page_offset
        data[start: start + chunk.total_compressed_size] = b"\xff" * chunk.total_compressed_size
    file.write_bytes(bytes(data))


def test_error_inside_a_rank_reaches_the_user_whole_and_once(tiny_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    (file,) = (data / "train").glob("*.parquet")
    corrupt_column_pages(file, 1)
    proc = recbalance("train", "--config", "configs/demo.toml", *tiny_overrides(data),
                      "--output-dir", str(tmp_path / "run"), "--nproc-per-node", "2")
    assert proc.returncode == 1
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("recbalance: error: rank")]
    assert f"DataError: {file}: column 'conversion', row group" in line and "cannot read (corrupt file?)" in line
    assert "Deserializing page header failed." in proc.stderr  # the message's later lines, not only its last
    assert proc.stderr.count("cannot read (corrupt file?)") == 1
    assert "Traceback" not in proc.stderr and "elastic/multiprocessing" not in proc.stderr


def _empty_test_split(data: Path) -> None:
    for file in (data / "test").glob("*.parquet"):
        pq.write_table(pq.read_table(file).slice(0, 0), file)


def _unreadable_train_file(data: Path) -> None:
    (data / "train" / "part-00001.parquet").write_bytes(b"not parquet at all")


def _huge_table(data: Path) -> None:
    schema = json.loads((data / "schema.json").read_text())
    schema["sparse"][1]["num_embeddings"] = 2**42
    (data / "schema.json").write_text(json.dumps(schema))


@pytest.mark.parametrize("damage, message", [
    (_empty_test_split, "split 'test' has no rows"),
    (_unreadable_train_file, "part-00001.parquet: not a readable Parquet file"),
    (_huge_table, "'t_item_id': 4,398,046,511,104 rows x 8 dims = 131,072.0 GiB (140,737,488,355,328 bytes)"),
])
def test_data_problems_stop_the_run_before_any_rank_starts(tiny_dataset, tmp_path, damage, message):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    damage(data)
    proc = recbalance("train", "--config", "configs/demo.toml", *tiny_overrides(data),
                      "--output-dir", str(tmp_path / "run"), "--nproc-per-node", "2", timeout=60)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("recbalance: error: ") and message in proc.stderr
    assert "failed:" not in proc.stderr and "Traceback" not in proc.stderr  # no rank was started
    assert not (tmp_path / "run").exists()


def test_data_check_exits_1_when_it_finds_bad_rows(tiny_dataset, tmp_path, capsys):
    assert main(["data", "check", str(tiny_dataset)]) == 0
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    (file,) = (data / "valid").glob("*.parquet")
    table = pq.read_table(file)
    labels = table.column("click").to_pylist()
    labels[5] = 7.0  # not a binary label
    pq.write_table(table.set_column(0, "click", pa.array(labels, pa.float32())), file, row_group_size=256)
    assert main(["data", "check", str(data)]) == 1
    assert "valid: 300 rows in 2 row groups, 1 bad" in capsys.readouterr().out


@pytest.mark.parametrize("baseline, message", [
    (None, "--baseline {path}: cannot read a JSON report (FileNotFoundError"),
    ("{not json", "--baseline {path}: cannot read a JSON report (JSONDecodeError"),
    ('{"rows": [{"method": "equal", "level": "representation", "qps": 0}]}',
     "baseline: row 0 needs a method, a level and a positive qps; it has qps 0"),
    ('{"rows": [{"qps": 10.0}]}', "baseline: row 0 needs a method, a level and a positive qps; it has no method"),
    ('[1, 2]', "baseline: not a `recbalance bench qps` report"),
])
def test_bench_compare_exits_2_on_bad_input(tmp_path, capsys, baseline, message):
    path = tmp_path / "baseline.json"
    if baseline is not None:
        path.write_text(baseline)
    candidate = tmp_path / "candidate.json"
    candidate.write_text('{"rows": [{"method": "equal", "level": "representation", "qps": 10.0}]}')
    code = main(["bench", "compare", "--baseline", str(path), "--candidate", str(candidate), "--max-drop", "2"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("recbalance: error: bench compare: ") and err.count("\n") == 1
    assert message.format(path=path) in err

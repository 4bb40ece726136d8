"""`recbalance train` rerun in an existing output directory, the way a user does it: a
tampered checkpoint stops the run untouched, a checkpoint of another model or method is
refused (and --fresh sets it aside), a finished run is reported complete with its files
untouched, and every JSON file is strict. One finished run is copied into each test."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.test_checkpoint import dotted_global_pickle
from tests.test_cli_train import recbalance, tiny_overrides

BAD_TEST_ROWS = 3


@dataclass
class Finished:
    data: Path
    out: Path
    stdout: str


def with_bad_labels(source: Path, target: Path) -> Path:
    """A copy of `source` whose test split has BAD_TEST_ROWS NaN labels and whose train split
    has a NaN label every 100 rows."""
    shutil.copytree(source, target)
    for split, rows in (("test", np.arange(BAD_TEST_ROWS)), ("train", None)):
        for file in (target / split).glob("*.parquet"):
            table = pq.read_table(file)
            click = table.column("click").to_numpy().copy()
            click[rows if rows is not None else np.arange(0, len(click), 100)] = np.nan
            table = table.set_column(table.schema.get_field_index("click"), "click", pa.array(click, pa.float32()))
            pq.write_table(table, file, row_group_size=256)
    return target


def train(data: Path, out: Path, *extra: str, nproc: int = 1):
    sets = ["checkpoint.every=4", 'data.bad_rows="skip"']
    return recbalance("train", "--config", "configs/demo.toml", *tiny_overrides(data),
                      *[a for s in sets for a in ("--set", s)], *extra, "--output-dir", str(out),
                      "--nproc-per-node", str(nproc))


@pytest.fixture(scope="module")
def finished(tiny_dataset, tmp_path_factory) -> Finished:
    """A 12-step run with checkpoints at steps 8 and 12 (keep = 2) and bad rows skipped."""
    root = tmp_path_factory.mktemp("finished")
    data = with_bad_labels(tiny_dataset, root / "data")
    proc = train(data, root / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Finished(data, root / "run", proc.stdout)


def copy_of(finished: Finished, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished.out, out)
    return out


def tree(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` with its bytes: equal trees mean nothing was touched."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def strict_json(path: Path):
    def refuse(constant: str):
        raise AssertionError(f"{path} holds {constant}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_skipped_rows_are_counted_per_split(finished):
    summary = strict_json(finished.out / "summary.json")
    assert summary["skipped_rows"]["test"] == BAD_TEST_ROWS
    assert summary["skipped_rows"]["train"] > 0
    assert set(summary["skipped_rows"]) == {"train", "test"}
    assert f"test {BAD_TEST_ROWS}" in finished.stdout and "bad rows skipped" in finished.stdout


def test_tampered_checkpoint_stops_the_run_and_is_kept(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    marker = tmp_path / "pwned"
    metadata = out / "checkpoints" / "step-000000012" / ".metadata"
    metadata.write_bytes(dotted_global_pickle("torch.distributed.checkpoint.filesystem", f"touch {marker}"))
    before = tree(out)
    proc = train(finished.data, out, nproc=2)
    assert proc.returncode == 1
    assert not marker.exists()
    assert f"checkpoint {metadata} asks for torch.distributed.checkpoint.filesystem.os.system" in proc.stderr
    assert proc.stderr.count("asks for") == 1 and "Traceback" not in proc.stderr
    assert "could not be loaded" not in proc.stdout  # not mistaken for a truncated one
    assert tree(out) == before  # neither loaded, set aside, overwritten nor pruned


@pytest.mark.parametrize("change, named", [
    ("model.num_experts=3", "model.heads.experts.2."),
    ("balance.method=multibalance", "model.balance_point.balancer."),
])
def test_checkpoint_of_another_model_or_method_is_refused(finished, tmp_path, change, named):
    out = copy_of(finished, tmp_path)
    before = tree(out)
    proc = train(finished.data, out, "--set", change)
    assert proc.returncode == 1
    assert "does not fit this config" in proc.stderr and named in proc.stderr and "--fresh" in proc.stderr
    assert tree(out) == before


def test_fresh_sets_the_old_checkpoints_aside(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    old = tree(out / "checkpoints")
    proc = train(finished.data, out, "--set", "model.num_experts=3", "--fresh")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (aside,) = (out / "checkpoints").glob("previous-*")
    assert tree(aside) == old and f"moved to {aside}" in proc.stdout
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000000008", "step-000000012"]
    assert strict_json(out / "summary.json")["resumed_from_step"] is None


def test_rerun_of_a_finished_run_changes_nothing(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    before = tree(out)
    proc = train(finished.data, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "is complete (step 12 of 12)" in proc.stdout
    assert "QPS (training examples/s, all ranks, after warm-up)" in proc.stdout  # the finished run's table
    assert tree(out) == before


def test_rerun_with_fewer_steps_says_so(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    before = tree(out)
    proc = train(finished.data, out, "--set", "train.steps=8")
    assert proc.returncode == 1
    assert "is at step 12, beyond the 8 steps this config trains" in proc.stderr
    assert tree(out) == before


def test_run_stopped_while_evaluating_only_evaluates_and_writes_strict_json(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    for name in ("summary.json", "history.json", "config.json"):
        (out / name).unlink()
    checkpoints = tree(out / "checkpoints")
    proc = train(finished.data, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = strict_json(out / "summary.json")
    assert summary["steps"] == 12 and summary["resumed_from_step"] == 12
    assert summary["qps"] is None and summary["train_seconds"] is None
    assert "trained 0 step(s)" in summary["qps_note"] and summary["qps_note"] in proc.stdout
    strict_json(out / "history.json")
    assert tree(out / "checkpoints") == checkpoints  # nothing trained, nothing saved again


def test_resumed_run_continues_its_history(finished, tmp_path):
    """history.json (written with every checkpoint) is read back on resume: the points up to
    the checkpoint stay, later ones come from the resumed training; the summary's mean
    cosine covers the whole run."""
    out = copy_of(finished, tmp_path)
    first = strict_json(out / "history.json")
    history = out / "history.json"
    # as if the run had been stopped after a later point that the checkpoint does not cover
    history.write_text(json.dumps(first + [{"step": 14, "qps": 1.0, "cosines": [[1.0, 9.0], [9.0, 1.0]]}]))
    proc = train(finished.data, out, "--set", "train.steps=16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    points = strict_json(history)
    assert [p["step"] for p in points if "qps" in p] == [4, 8, 12, 16]
    assert points[: len(first)] == first
    summary = strict_json(out / "summary.json")
    cosines = [p["cosines"][0][1] for p in points if p.get("cosines")]
    assert len(cosines) == 4
    assert summary["cosines"]["click~conversion"]["mean"] == pytest.approx(sum(cosines) / 4)


def test_unreadable_history_is_a_warning_not_a_failure(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    (out / "history.json").write_text("{not json")
    proc = train(finished.data, out, "--set", "train.steps=16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "history.json is not readable JSON" in proc.stdout and "starts again at step 12" in proc.stdout
    assert [p["step"] for p in strict_json(out / "history.json") if "qps" in p] == [16]

"""`recbalance bench qps` and `bench compare`, end to end on a tiny config."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.bench.qps import compare

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.run.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_bench_qps_writes_consistent_tables(tiny_dataset, tmp_path):
    out = tmp_path / "bench"
    proc = run("bench", "qps", "--config", "configs/synthetic.toml", "--set", f'data.path="{tiny_dataset}"',
               "--set", "data.global_batch_size=64", "--set", "model.shared_layers=[16]",
               "--set", "model.tower_layers=[4]", "--variants", "multibalance@representation,multibalance@parameters",
               "--rounds", "2", "--steps-per-round", "3", "--warmup-rounds", "1", "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "qps.json").read_text())
    rows = {(r["method"], r["level"]): r for r in report["rows"]}
    # equal@representation is always measured: it is the ratio's denominator
    assert set(rows) == {("equal", "representation"), ("multibalance", "representation"),
                         ("multibalance", "parameters")}
    equal = rows[("equal", "representation")]
    assert equal["qps_ratio"] == 1.0
    for r in rows.values():
        assert r["steps_measured"] == 2 * 3
        assert r["min_step_ms"] <= r["median_step_ms"] <= r["max_step_ms"]
        assert r["qps"] == pytest.approx(64 / (r["median_step_ms"] / 1e3))
        assert r["qps_ratio"] == pytest.approx(equal["median_step_ms"] / r["median_step_ms"])
        assert 0.0 < r["balance_share"] < 1.0
        assert 0.0 < r["balance_median_us"] < 1e3 * r["max_step_ms"]
        assert len(r["round_median_ms"]) == 2
        ratios = sorted(e / own for e, own in zip(equal["round_median_ms"], r["round_median_ms"]))
        assert r["paired_ratio"] == pytest.approx(sum(ratios) / 2)
        assert r["paired_ratio_q1"] <= r["paired_ratio"] <= r["paired_ratio_q3"]
    assert (out / "qps.md").read_text().count("| multibalance |") == 2
    assert (out / "qps.png").stat().st_size > 0
    assert "round 3/3 (measured)" in proc.stdout


def _report(qps: dict[tuple[str, str], float]) -> dict:
    return {"rows": [{"method": m, "level": lvl, "qps": q} for (m, lvl), q in qps.items()]}


def test_compare_arithmetic():
    rows, ok = compare(_report({("equal", "representation"): 1000.0, ("cograd", "representation"): 500.0}),
                       _report({("equal", "representation"): 970.0, ("cograd", "representation"): 400.0}), 5.0)
    by = {r["method"]: r for r in rows}
    assert by["equal"]["drop_pct"] == pytest.approx(3.0) and not by["equal"]["failed"]
    assert by["cograd"]["drop_pct"] == pytest.approx(20.0) and by["cograd"]["failed"]
    assert not ok
    with pytest.raises(ValueError, match="share no"):
        compare(_report({("a", "representation"): 1.0}), _report({("b", "representation"): 1.0}), 5.0)


@pytest.mark.parametrize("candidate_qps, code", [(960.0, 0), (940.0, 1)])
def test_compare_gate_exit_code(tmp_path, candidate_qps, code):
    base, cand = tmp_path / "base.json", tmp_path / "cand.json"
    base.write_text(json.dumps(_report({("equal", "representation"): 1000.0})))
    cand.write_text(json.dumps(_report({("equal", "representation"): candidate_qps})))
    proc = run("bench", "compare", "--baseline", str(base), "--candidate", str(cand), "--max-drop", "5")
    assert proc.returncode == code
    assert ("FAILED" in proc.stdout) == (code == 1)

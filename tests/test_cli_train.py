"""`recbalance train` end to end, the way a user runs it: 2 local gloo ranks from the CLI,
and configuration errors caught before any rank starts."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def recbalance(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainer.run.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def tiny_overrides(data: Path) -> list[str]:
    sets = [
        f'data.path="{data}"', "data.global_batch_size=64", "data.eval_batch_size=256", "train.steps=12",
        "train.log_every=4", "model.num_experts=2", "model.expert_layers=[8]", "model.shared_layers=[16]",
        "model.dense_layers=[8]", "model.tower_layers=[4]", "metrics.port=0",
        "balance.method=equal",  # the tests' baseline (demo.toml trains MultiBalance)
    ]
    return [arg for s in sets for arg in ("--set", s)]


def test_two_rank_training_writes_summary(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    proc = recbalance("train", "--config", "configs/demo.toml", *tiny_overrides(tiny_dataset),
                      "--set", "balance.method=multibalance", "--output-dir", str(out), "--nproc-per-node", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["steps"] == 12
    assert summary["examples_seen"] == 12 * 64
    assert summary["global_batch_size"] == 64
    assert (summary["method"], summary["model"]) == ("multibalance", "mmoe")
    assert summary["qps"] > 0
    assert set(summary["tasks"]) == {"click", "conversion"}
    for metrics in summary["tasks"].values():
        assert 0.0 <= metrics["auc"] <= 1.0
        assert math.isfinite(metrics["ne"]) and metrics["ne"] > 0
        assert math.isfinite(metrics["loss"]) and metrics["loss"] > 0
        assert math.isfinite(metrics["calibration"]) and metrics["calibration"] > 0
    assert "calib" in proc.stdout
    # 12 steps against the ~100 its moving average of gradient norms remembers: said once, by rank 0
    assert proc.stdout.count("recbalance: note: multibalance: this run has 12 steps, 0.1x") == 1
    assert set(summary["weights"]) == {"click", "conversion"}
    assert {t["sharding_type"] for t in summary["sharding"].values()} <= {
        "table_wise", "row_wise", "column_wise", "table_row_wise"
    }
    history = json.loads((out / "history.json").read_text())
    assert [p["step"] for p in history if "qps" in p] == [4, 8, 12]
    # progress lines while training, the table at the end
    assert "step 4/12" in proc.stdout and "step 12/12" in proc.stdout
    assert "NE" in proc.stdout and "AUC" in proc.stdout and "QPS" in proc.stdout
    assert str(out.resolve()) in proc.stdout
    # the balancer's view next to NE and AUC: weights, gradient norms, the pair's cosine
    assert set(summary["grad_norms"]) == {"click", "conversion"} and set(summary["cosines"]) == {"click~conversion"}
    cosine = summary["cosines"]["click~conversion"]
    mean = sum(p["cosines"][0][1] for p in history if "cosines" in p) / 3
    assert cosine["mean"] == pytest.approx(mean) and -1.0 <= cosine["last"] <= 1.0
    assert "weight  grad norm" in proc.stdout and f"click~conversion {cosine['last']:+.3f}" in proc.stdout


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.kind=dlrm"], "config key 'model.kind': 'dlrm' is not allowed; expected one of 'mmoe', 'shared_bottom'"),
        (["balance.method=magic"], "balance.method"),
        (["balance.options.beta=-1", "balance.method=multibalance"], "beta"),
        (["data.global_batch_size=63"], "config key 'data.global_batch_size': 63 is not divisible by the world size 2"),
        (['data.path="/nonexistent/data"'], "config key 'data.path': '/nonexistent/data' holds no schema.json"),
    ],
)
def test_config_errors_stop_before_training(tiny_dataset, tmp_path, overrides, message):
    sets = [a for o in [f'data.path="{tiny_dataset}"', *overrides] for a in ("--set", o)]
    proc = recbalance("train", "--config", "configs/demo.toml", *sets, "--output-dir", str(tmp_path / "r"),
                      "--nproc-per-node", "2", timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()

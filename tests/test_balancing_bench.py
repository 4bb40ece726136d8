"""`python -m balancing.bench` runs tiny on the CPU: every variant is timed, the paired ratios
and the node's time are computed and written as JSON and Markdown (no figure is asserted)."""
from __future__ import annotations

import json
import math

import pytest

from balancing.bench import main

TINY = ["--device", "cpu", "--rows", "50", "--sparse-features", "3", "--dim", "4", "--dense-features", "5",
        "--cross-layers", "1", "--cross-rank", "4", "--experts", "2", "--batch", "32", "--rounds", "2",
        "--steps-per-round", "1", "--warmup-rounds", "1"]


@pytest.mark.parametrize("model, dtype, path", [("shared_bottom", "fp32", "auto"), ("mmoe", "bf16", "device")])
def test_bench_runs_every_variant(tmp_path, model, dtype, path):
    variants = "none,equal,multibalance,cograd,mgda,pcgrad,multibalance@parameters"
    assert main(TINY + ["--model", model, "--dtype", dtype, "--path", path, "--variants", variants,
                        "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert list(report["variants"]) == variants.split(",")
    assert report["model"] == model and report["dtype"] == dtype and report["path"] == path
    for name, r in report["variants"].items():
        assert len(r["round_step_ms"]) == 2 and r["qps"] > 0
        ratio = r["paired_qps_ratio"]
        assert ratio["q1"] <= ratio["median"] <= ratio["q3"] and math.isfinite(ratio["median"])
        has_node = name not in ("none", "multibalance@parameters")
        assert (r["node_ms"] is not None) is has_node
    assert report["variants"]["none"]["paired_qps_ratio"]["median"] == 1.0
    table = (tmp_path / "bench.md").read_text()
    assert all(f"| {v} |" in table for v in variants.split(","))


@pytest.mark.parametrize("variants, message", [
    ("equal,none", "the first variant must be 'none'"),
    ("none,nosuch", "unknown method"),
    ("none,equal@weights", "level must be"),
])
def test_bench_rejects_bad_variants(tmp_path, variants, message):
    with pytest.raises(SystemExit, match=message):
        main(TINY + ["--variants", variants, "--out", str(tmp_path)])

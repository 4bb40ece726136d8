"""deploy/: promtool accepts the Prometheus config and rules; the Grafana dashboard parses,
and every metric its queries and the rules name is one the exporter really serves (read
from a live scrape of an exporter fed with events), a recording rule, or the pushed
baseline."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml

from trainer.observe.events import Evaluation, Progress, StepRecord, TaskProgress
from trainer.observe.sinks import PrometheusSink
from trainer.observe.prometheus import baseline_registry

ROOT = Path(__file__).resolve().parents[1]
PROM = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "recbalance.json"
RULE_FILES = sorted((PROM / "rules").glob("*.yml"))
# a metric name: recbalance_… or a recording rule recbalance:…; not followed by "(" (a function)
# nor inside a label value ("…")
NAME = re.compile(r'(?<![\w:"-])(recbalance[_:][A-Za-z0-9_:]*)(?![\w:(])')


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian package 'prometheus'; .ci/run installs it with apt-get)")
    return path


def test_promtool_check_rules():
    assert len(RULE_FILES) >= 2
    result = subprocess.run([promtool(), "check", "rules", *map(str, RULE_FILES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_config():
    result = subprocess.run([promtool(), "check", "config", str(PROM / "prometheus.yml")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 rule files found" in result.stdout


def test_podmonitor_is_a_podmonitor_on_the_metrics_port():
    doc = yaml.safe_load((PROM / "podmonitor.yaml").read_text())
    assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "PodMonitor"
    from launch.components import DEFAULT_METRICS_PORT  # the container port is named "metrics"

    assert DEFAULT_METRICS_PORT == 9400
    assert [e["port"] for e in doc["spec"]["podMetricsEndpoints"]] == ["metrics"]
    assert doc["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "recbalance"}


def live_scrape() -> str:
    """/metrics of a serving exporter that saw every kind of event."""
    sink = PrometheusSink(tasks=["click", "conversion"], rank=0, local_rank=0, world_size=2, method="multibalance",
                          model="mmoe", level="representation", port=0, run_id="deploy-test", announce=False)
    try:
        sink.on_step(StepRecord(step=1, step_seconds=0.02, data_wait_seconds=0.001, balance_seconds=0.0003,
                                examples=512, nonfinite=True))
        sink.on_progress(Progress(
            step=1, total_steps=10, elapsed_seconds=0.1, eta_seconds=0.9, qps=5000.0, qps_lifetime=4000.0,
            examples_total=512, tasks={"click": TaskProgress(0.5, 0.9, 0.95), "conversion": TaskProgress(0.3, 0.8, 0.85)},
            weights=[0.9, 1.1], grad_norms=[1.0, 2.0], cosines=[[1.0, 0.2], [0.2, 1.0]],
            gpu_memory={"allocated": 1e9, "reserved": 2e9, "peak": 1.5e9}))
        for split in ("valid", "test"):
            sink.on_eval(Evaluation(step=1, split=split, tasks={
                t: {"ne": 0.9, "auc": 0.7, "loss": 0.4, "gauc": 0.6, "calibration": 1.0}
                for t in ("click", "conversion")}))
        sink.on_checkpoint(1)
        with urllib.request.urlopen(f"http://127.0.0.1:{sink.port}/metrics", timeout=5) as response:
            return response.read().decode()
    finally:
        sink.close(None)


def exported_names(text: str) -> set[str]:
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def recording_rules() -> set[str]:
    return {rule["record"] for f in RULE_FILES for g in yaml.safe_load(f.read_text())["groups"]
            for rule in g["rules"] if "record" in rule}


def rule_exprs() -> list[str]:
    return [rule["expr"] for f in RULE_FILES for g in yaml.safe_load(f.read_text())["groups"] for rule in g["rules"]]


def dashboard_queries(dashboard: dict) -> list[str]:
    queries = []

    def walk(panels):
        for panel in panels:
            queries.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    for var in dashboard.get("templating", {}).get("list", []):
        q = var.get("query")
        if isinstance(q, dict):
            q = q.get("query")
        if var.get("type") == "query" and q:
            queries.append(q)
    return queries


@pytest.fixture(scope="module")
def known_names() -> set[str]:
    served = exported_names(live_scrape())
    from prometheus_client import generate_latest

    baseline = exported_names(generate_latest(baseline_registry(
        {"method": "m", "model": "mmoe", "world_size": 2, "qps": 1.0})[0]).decode())
    return served | baseline | recording_rules()


def test_the_exporter_serves_the_required_names(known_names):
    required = {"recbalance_train_examples_total", "recbalance_qps", "recbalance_task_ne", "recbalance_task_auc",
                "recbalance_task_loss", "recbalance_task_weight", "recbalance_task_grad_norm",
                "recbalance_task_grad_cosine", "recbalance_balance_seconds_bucket", "recbalance_step_seconds_bucket",
                "recbalance_data_wait_seconds_bucket", "recbalance_nonfinite_steps_total",
                "recbalance_last_checkpoint_step", "recbalance_info"}
    assert required <= known_names, required - known_names


def test_dashboard_parses_and_names_only_exported_metrics(known_names):
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"] and dashboard["schemaVersion"] >= 30
    queries = dashboard_queries(dashboard)
    assert len(queries) >= 15
    used = {name for q in queries for name in NAME.findall(q)}
    assert used and used <= known_names, sorted(used - known_names)
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("qps vs baseline", "ne", "auc", "task weights", "cosine", "balance point share of step time"):
        assert topic in titles, topic
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_rules_name_only_exported_or_recorded_metrics(known_names):
    used = {name for expr in rule_exprs() for name in NAME.findall(expr)}
    assert {"recbalance_qps", "recbalance_nonfinite_steps_total", "recbalance_task_ne"} <= used
    assert used <= known_names, sorted(used - known_names)


def test_name_pattern_skips_label_values_and_finds_rule_names():
    q = 'recbalance:qps:live * on (job) recbalance_info{job="recbalance", run_id="recbalance-1"}'
    assert set(NAME.findall(q)) == {"recbalance:qps:live", "recbalance_info"}

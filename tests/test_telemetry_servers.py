"""Against real servers (Debian's prometheus and prometheus-pushgateway, installed by
.ci/run): a real Prometheus scrapes a short 2-rank training run and its HTTP API returns the
run's QPS, NE per task and task weights; the run's final figures and a QPS baseline are
pushed to a real Pushgateway and read back. Every server binds 127.0.0.1 only and is
stopped in teardown."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from trainer.run.distributed import free_port
from trainer.observe.events import Progress, TaskProgress
from trainer.observe.sinks import PrometheusSink
from trainer.observe.prometheus import push_baseline

ROOT = Path(__file__).resolve().parents[1]
RULES = sorted((ROOT / "deploy" / "prometheus" / "rules").glob("*.yml"))


def binary(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package '{name}'; .ci/run installs it with apt-get) — "
                    "skipping the real-server test")
    return path


def get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


class Server:
    """A server process on 127.0.0.1:port, ready when GET /-/ready answers."""

    def __init__(self, args: list[str], port: int, log: Path) -> None:
        self.port, self.url, self.log = port, f"http://127.0.0.1:{port}", log
        self.out = open(log, "wb")
        self.proc = subprocess.Popen(args, stdout=self.out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                get(self.url + "/-/ready", timeout=1)
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{args[0]} did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()


@pytest.fixture()
def pushgateway(tmp_path):
    exe = binary("prometheus-pushgateway")
    port = free_port()
    server = Server([exe, f"--web.listen-address=127.0.0.1:{port}"], port, tmp_path / "pushgateway.log")
    yield server
    server.stop()


def start_prometheus(tmp_path: Path, targets: list[str], pushgateway: str | None) -> Server:
    exe = binary("prometheus")
    scrape = [{"job_name": "recbalance", "scrape_interval": "1s", "scrape_timeout": "1s",
               "static_configs": [{"targets": targets}]}]
    if pushgateway:
        scrape.append({"job_name": "pushgateway", "honor_labels": True, "scrape_interval": "1s",
                       "scrape_timeout": "1s", "static_configs": [{"targets": [pushgateway]}]})
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "rule_files": [str(p) for p in RULES], "scrape_configs": scrape}
    path = tmp_path / "prometheus.yml"
    path.write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    return Server([exe, f"--config.file={path}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                   f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], port, tmp_path / "prometheus.log")


def query(server: Server, promql: str) -> list[dict]:
    body = json.loads(get(f"{server.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})))
    assert body["status"] == "success", body
    return body["data"]["result"]


def samples(series: dict) -> list[tuple[float, float]]:
    return [(float(t), float(v)) for t, v in series["values"]]


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def test_prometheus_scrapes_a_two_rank_training_run(tmp_path, tiny_dataset, pushgateway):
    """A real Prometheus scrapes rank 0's exporter every second during a 2-rank CLI run;
    every scraped QPS, NE and weight value is one of the run's progress points in
    history.json, the last ones are the final progress point, and the recording rules
    join QPS with the run's description. The run pushes its final figures to a real
    Pushgateway, which Prometheus scrapes too."""
    port = free_port()
    prometheus = start_prometheus(tmp_path, [f"127.0.0.1:{port}"], f"127.0.0.1:{pushgateway.port}")
    out = tmp_path / "run"
    run_id = f"test-{port}"
    cmd = [sys.executable, "-m", "trainer.run.cli", "train", "--config", str(ROOT / "configs" / "synthetic.toml"),
           "--set", f'data.path="{tiny_dataset}"', "--set", "data.global_batch_size=128",
           "--set", "data.eval_batch_size=512", "--set", "train.steps=200", "--set", "train.log_every=10",
           "--set", "balance.method=multibalance", "--set", f"metrics.port={port}",
           "--set", f'metrics.pushgateway="{pushgateway.url}"', "--set", f'metrics.run_id="{run_id}"',
           "--output-dir", str(out), "--nproc-per-node", "2"]
    try:
        started = time.monotonic()
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert f"metrics: http://127.0.0.1:{port}/metrics" in result.stdout
        print(f"training run: {time.monotonic() - started:.1f}s")
        history = [p for p in json.loads((out / "history.json").read_text()) if "qps" in p]
        summary = json.loads((out / "summary.json").read_text())
        tasks = list(summary["tasks"])
        assert (out / "training.png").exists()

        live = f'instance="127.0.0.1:{port}"'  # the exporter (the Pushgateway's series have no instance)
        qps = query(prometheus, f"recbalance_qps{{{live}}}[10m]")
        assert len(qps) == 1, qps
        scraped = [v for _, v in samples(qps[0]) if not math.isnan(v)]
        assert len(scraped) >= 2, f"only {len(scraped)} scrapes saw a progress point; see {prometheus.log}"
        known = [p["qps"] for p in history if p["qps"] is not None]  # null (strict JSON) before the warm-up
        assert all(any(close(v, k) for k in known) for v in scraped), (scraped, known)

        # NE per task and the weights: at every scrape, all values come from ONE progress point
        series = {}
        for t in tasks:
            (ne,) = query(prometheus, f'recbalance_task_ne{{task="{t}", split="train", window="recent", {live}}}[10m]')
            (w,) = query(prometheus, f'recbalance_task_weight{{task="{t}", {live}}}[10m]')
            series[f"ne_{t}"], series[f"w_{t}"] = dict(samples(ne)), dict(samples(w))
        stamps = sorted(set.intersection(*(set(s) for s in series.values())))
        assert len(stamps) >= 2
        points = [({f"ne_{t}": p["tasks"][t]["ne_window"] for t in tasks}
                   | {f"w_{t}": p["weights"][m] for m, t in enumerate(tasks)}) for p in history]
        for stamp in stamps:
            seen = {k: s[stamp] for k, s in series.items()}
            assert any(all(close(seen[k], p[k]) for k in seen) for p in points), (seen, points)
        weights_seen = {series[f"w_{tasks[0]}"][s] for s in stamps}
        assert len(weights_seen) >= 2, "the weights did not move between scrapes"
        # (the final eval and the end come faster than a scrape: the Pushgateway has the final figures)

        (info,) = query(prometheus, f"recbalance_info{{{live}}}[10m]")
        assert info["metric"]["method"] == "multibalance" and info["metric"]["world_size"] == "2"
        assert info["metric"]["run_id"] == run_id
        steps = query(prometheus, f"max_over_time(recbalance_train_steps_total{{{live}}}[10m])")
        assert 0 < float(steps[0]["value"][1]) <= 200
        # recording rule: QPS joined with the run's description
        joined = query(prometheus, "recbalance:qps:live[10m]")
        assert len(joined) == 1 and joined[0]["metric"]["method"] == "multibalance", joined
        assert joined[0]["metric"]["run_id"] == run_id

        # the run's push at close, read back from the Pushgateway ...
        pushed = parse(get(pushgateway.url + "/metrics").decode())
        group = {"job": "recbalance", "run_id": run_id, "instance": ""}

        def p(name: str, **labels: str) -> float:
            return pushed[(name, frozenset((group | labels).items()))]

        assert close(p("recbalance_qps"), summary["qps"])
        assert p("recbalance_run_completed") == 1
        assert p("recbalance_train_examples_total") == summary["examples_seen"]
        assert p("recbalance_train_steps_total") == summary["steps"] == 200
        split = summary["eval_split"]
        for t in tasks:
            assert close(p("recbalance_task_ne", task=t, split=split, window="lifetime"), summary["tasks"][t]["ne"])
            assert close(p("recbalance_task_auc", task=t, split=split), summary["tasks"][t]["auc"])
            assert close(p("recbalance_task_calibration", task=t, split=split), summary["tasks"][t]["calibration"])
            assert close(p("recbalance_task_weight", task=t), summary["weights"][t])
        # ... and through Prometheus (honor_labels keeps job and run_id; no instance label)
        deadline = time.monotonic() + 10
        while not (final := query(prometheus, f'recbalance_qps{{run_id="{run_id}"}}')) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert final and close(float(final[0]["value"][1]), summary["qps"])
        assert "instance" not in final[0]["metric"]
    finally:
        prometheus.stop()


def progress() -> Progress:
    return Progress(step=20, total_steps=20, elapsed_seconds=2.0, eta_seconds=0.0, qps=3000.0, qps_lifetime=2900.0,
                    examples_total=5120, tasks={"click": TaskProgress(0.5, 0.9, 0.95), "conversion": TaskProgress(0.3, 0.8, 0.85)},
                    weights=[0.75, 1.25], grad_norms=[1.0, 2.0], cosines=[[1.0, 0.1], [0.1, 1.0]])


def test_push_final_figures_and_baseline(pushgateway):
    summary = {"method": "multibalance", "model": "mmoe", "level": "representation", "world_size": 2, "qps": 2987.5,
               "examples_seen": 5120, "steps": 20, "train_seconds": 2.0, "eval_split": "test",
               "tasks": {"click": {"ne": 0.91, "auc": 0.72, "loss": 0.4}, "conversion": {"ne": 0.82, "auc": 0.79, "loss": 0.3}},
               "weights": {"click": 0.75, "conversion": 1.25}}
    for run_id in ("run-a", "run-b"):
        sink = PrometheusSink(tasks=["click", "conversion"], rank=0, local_rank=0, world_size=2, method="multibalance",
                              model="mmoe", level="representation", pushgateway=pushgateway.url, job="recbalance-test",
                              run_id=run_id, serve=False)
        sink.on_progress(progress())
        sink.close(summary if run_id == "run-a" else None)  # run-b "failed"
    assert push_baseline(pushgateway.url, summary, qps=3100.0) == {
        "method": "multibalance", "model": "mmoe", "level": "representation", "world_size": "2"}
    pushed = parse(get(pushgateway.url + "/metrics").decode())
    a = {"job": "recbalance-test", "run_id": "run-a", "instance": ""}
    b = a | {"run_id": "run-b"}

    def p(group: dict, name: str, **labels: str) -> float:
        return pushed[(name, frozenset((group | labels).items()))]

    assert p(a, "recbalance_qps") == 2987.5
    assert p(a, "recbalance_run_completed") == 1
    assert p(a, "recbalance_task_ne", task="conversion", split="test", window="lifetime") == 0.82
    assert p(a, "recbalance_task_ne", task="click", split="train", window="recent") == 0.9
    assert p(a, "recbalance_task_auc", task="click", split="test") == 0.72
    assert p(a, "recbalance_task_weight", task="conversion") == 1.25
    assert p(a, "recbalance_train_examples_total") == 5120
    assert p(a, "recbalance_train_steps_total") == 20
    assert p(a, "recbalance_info", method="multibalance", model="mmoe", world_size="2", level="representation",
             version=sink.info_labels["version"]) == 1
    assert p(b, "recbalance_run_completed") == 0
    assert p(b, "recbalance_qps") == 2900.0  # lifetime QPS of the last progress point
    assert p(b, "recbalance_task_weight", task="click") == 0.75
    baseline = {"job": "recbalance-baseline", "method": "multibalance", "model": "mmoe", "level": "representation",
                "world_size": "2", "instance": ""}
    assert p(baseline, "recbalance_qps_baseline") == 3100.0


def test_qps_gate_pushes_its_comparison(pushgateway, tmp_path):
    """`recbalance bench compare --pushgateway URL` leaves the comparison on a real Pushgateway."""
    import json
    import subprocess
    import sys

    def report(qps: float) -> dict:
        return {"rows": [{"method": "equal", "level": "representation", "qps": qps}]}

    (tmp_path / "base.json").write_text(json.dumps(report(1000.0)))
    (tmp_path / "cand.json").write_text(json.dumps(report(900.0)))
    proc = subprocess.run([sys.executable, "-m", "trainer.run.cli", "bench", "compare", "--baseline",
                           str(tmp_path / "base.json"), "--candidate", str(tmp_path / "cand.json"), "--max-drop", "5",
                           "--pushgateway", pushgateway.url], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "pushed to" in proc.stdout
    pushed = parse(get(pushgateway.url + "/metrics").decode())
    group = {"job": "recbalance-qps-gate", "instance": "", "method": "equal", "level": "representation"}
    assert abs(pushed[("recbalance_qps_gate_drop_percent", frozenset(group.items()))] - 10.0) < 1e-9
    assert pushed[("recbalance_qps_gate_failed", frozenset(group.items()))] == 1.0
    assert pushed[("recbalance_qps_gate_baseline", frozenset(group.items()))] == 1000.0

"""The Prometheus exporter sink, the end-of-run plot and the [metrics] config, from
hand-built events (no training)."""
from __future__ import annotations

import math
import socket
import urllib.request
from pathlib import Path

import pytest
import torch

from trainer.config import ConfigError, load_config
from trainer.run.distributed import DistEnv, free_port
from trainer.observe.events import Evaluation, Progress, StepRecord, TaskProgress
from trainer.observe.history import HistorySink
from trainer.observe.sinks import PLOT_NAME, PrometheusSink, TrainingPlot, make_sinks

TASKS = ["click", "conversion"]


def sink(rank: int = 0, local_rank: int | None = None, **kw) -> PrometheusSink:
    kw.setdefault("serve", False)
    return PrometheusSink(
        tasks=TASKS, rank=rank, local_rank=rank if local_rank is None else local_rank, world_size=2,
        method="multibalance", model="mmoe", level="representation", run_id=kw.pop("run_id", "run-1"), **kw,
    )


def progress(step: int = 10, weights=(0.8, 1.2)) -> Progress:
    return Progress(
        step=step, total_steps=100, elapsed_seconds=1.0, eta_seconds=9.0, qps=5000.0 + step, qps_lifetime=4000.0,
        examples_total=step * 256,
        tasks={"click": TaskProgress(loss=0.5, ne_window=0.95, ne_lifetime=0.99),
               "conversion": TaskProgress(loss=0.3, ne_window=0.85, ne_lifetime=0.9)},
        weights=None if weights is None else list(weights), grad_norms=[1.5, 2.5], cosines=[[1.0, -0.25], [-0.25, 1.0]],
    )


def evaluation(split: str = "valid") -> Evaluation:
    return Evaluation(step=10, split=split, tasks={
        "click": {"ne": 0.93, "auc": 0.71, "loss": 0.45, "calibration": 1.02},
        "conversion": {"ne": 0.8, "auc": 0.77, "loss": 0.3, "calibration": 0.97}})


def value(s: PrometheusSink, name: str, **labels) -> float | None:
    return s.registry.get_sample_value(name, labels)


def test_events_update_the_right_series():
    s = sink()
    assert value(s, "recbalance_info", method="multibalance", model="mmoe", world_size="2", version=s.info_labels["version"],
                 level="representation", run_id="run-1") == 1.0
    assert math.isnan(value(s, "recbalance_qps"))  # unknown before the first progress point, not 0
    for step, seconds in ((1, 0.004), (2, 0.03), (3, 2.0)):
        s.on_step(StepRecord(step=step, step_seconds=seconds, data_wait_seconds=0.0005, balance_seconds=0.0002,
                             examples=256, nonfinite=step == 2))
    assert value(s, "recbalance_train_examples_total") == 768
    assert value(s, "recbalance_train_steps_total") == 3
    assert value(s, "recbalance_train_step") == 3
    assert value(s, "recbalance_nonfinite_steps_total") == 1
    assert value(s, "recbalance_step_seconds_count") == 3
    assert value(s, "recbalance_step_seconds_sum") == pytest.approx(2.034)
    assert value(s, "recbalance_step_seconds_bucket", le="0.005") == 1
    assert value(s, "recbalance_step_seconds_bucket", le="0.05") == 2
    assert value(s, "recbalance_step_seconds_bucket", le="10.0") == 3
    assert value(s, "recbalance_data_wait_seconds_bucket", le="0.0005") == 3
    assert value(s, "recbalance_balance_seconds_bucket", le="0.00025") == 3

    s.on_progress(progress())
    assert value(s, "recbalance_qps") == 5010.0
    assert value(s, "recbalance_qps_lifetime") == 4000.0
    assert value(s, "recbalance_train_planned_steps") == 100
    assert value(s, "recbalance_train_eta_seconds") == 9.0
    assert value(s, "recbalance_task_ne", task="click", split="train", window="recent") == 0.95
    assert value(s, "recbalance_task_ne", task="conversion", split="train", window="lifetime") == 0.9
    assert value(s, "recbalance_task_loss", task="conversion") == 0.3
    assert value(s, "recbalance_task_weight", task="click") == 0.8
    assert value(s, "recbalance_task_weight", task="conversion") == 1.2
    assert value(s, "recbalance_task_grad_norm", task="conversion") == 2.5
    assert value(s, "recbalance_task_grad_cosine", task_a="click", task_b="conversion") == -0.25
    # one series per unordered pair, no diagonal
    assert value(s, "recbalance_task_grad_cosine", task_a="conversion", task_b="click") is None
    assert value(s, "recbalance_task_grad_cosine", task_a="click", task_b="click") is None

    s.on_eval(evaluation("valid"))
    s.on_eval(evaluation("test"))
    assert value(s, "recbalance_task_ne", task="click", split="valid", window="lifetime") == 0.93
    assert value(s, "recbalance_task_auc", task="conversion", split="test") == 0.77
    assert value(s, "recbalance_task_calibration", task="conversion", split="test") == 0.97
    assert value(s, "recbalance_eval_step", split="valid") == 10
    s.on_checkpoint(40)
    assert value(s, "recbalance_last_checkpoint_step") == 40
    assert value(s, "recbalance_exporter_update_seconds_total") > 0


def test_method_without_weights_exports_no_weight_series():
    s = sink()
    s.on_progress(progress(weights=None))
    assert value(s, "recbalance_task_weight", task="click") is None
    assert value(s, "recbalance_task_grad_norm", task="click") == 1.5


def test_other_ranks_export_nothing():
    s = sink(rank=1)
    s.on_step(StepRecord(step=1, step_seconds=0.01, data_wait_seconds=0.0, balance_seconds=0.0, examples=256))
    s.on_progress(progress())
    s.on_eval(evaluation())
    s.on_checkpoint(5)
    assert [m.name for m in s.registry.collect()] == []


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def test_served_endpoint_and_shutdown(capsys):
    s = sink(serve=True, port=0)
    try:
        assert s.port and "metrics: http://127.0.0.1:" in capsys.readouterr().out
        s.on_progress(progress())
        text = scrape(s.port)
        assert 'recbalance_task_weight{task="click"} 0.8' in text
        assert "recbalance_step_seconds_bucket" in text
        assert value(s, "recbalance_exporter_scrapes_total") == 1
    finally:
        s.close({"qps": 1.0})
    with pytest.raises(OSError):
        scrape(s.port)


def test_other_nodes_serve_an_empty_endpoint_and_other_local_ranks_no_port():
    empty = sink(rank=2, local_rank=0, serve=True, port=0)
    none = sink(rank=3, local_rank=1, serve=True, port=0)
    try:
        assert none.server is None and none.port is None
        assert "recbalance_" not in scrape(empty.port)
    finally:
        empty.close(None)
        none.close(None)


def test_busy_port_is_a_warning_not_a_failure(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        s = sink(serve=True, port=busy.getsockname()[1])
    assert s.server is None
    assert "metrics exporter not started" in capsys.readouterr().err
    s.on_progress(progress())  # still usable
    s.close(None)


def test_unreachable_pushgateway_is_a_warning(capsys):
    s = sink(pushgateway=f"http://127.0.0.1:{free_port()}")
    s.on_progress(progress())
    s.close(None)  # must not raise
    assert "could not push the final metrics" in capsys.readouterr().err


def test_final_registry_from_summary():
    s = sink()
    s.on_progress(progress())
    s.on_eval(evaluation("valid"))
    summary = {"qps": 1234.5, "examples_seen": 2560, "steps": 10, "train_seconds": 3.0, "eval_split": "test",
               "tasks": {"click": {"ne": 0.9, "auc": 0.7, "loss": 0.4, "calibration": 1.1},
                         "conversion": {"ne": 0.8, "auc": 0.75, "loss": 0.3, "calibration": 0.9}},
               "weights": {"click": 0.7, "conversion": 1.1}}
    r = s.final_registry(summary)
    get = r.get_sample_value
    assert get("recbalance_qps") == 1234.5
    assert get("recbalance_run_completed") == 1
    assert get("recbalance_train_examples_total") == 2560
    assert get("recbalance_train_steps_total") == 10
    assert get("recbalance_task_ne", {"task": "click", "split": "test", "window": "lifetime"}) == 0.9
    assert get("recbalance_task_ne", {"task": "click", "split": "valid", "window": "lifetime"}) == 0.93
    assert get("recbalance_task_auc", {"task": "conversion", "split": "test"}) == 0.75
    assert get("recbalance_task_calibration", {"task": "conversion", "split": "test"}) == 0.9
    assert get("recbalance_task_calibration", {"task": "click", "split": "valid"}) == 1.02
    assert get("recbalance_task_weight", {"task": "conversion"}) == 1.1
    failed = s.final_registry(None)
    assert failed.get_sample_value("recbalance_run_completed") == 0
    assert failed.get_sample_value("recbalance_task_weight", {"task": "click"}) == 0.8


def test_metrics_config_keys_and_ranges(tmp_path):
    cfg = load_config(None)
    assert (cfg.metrics.enabled, cfg.metrics.host, cfg.metrics.port, cfg.metrics.pushgateway, cfg.metrics.job) == (
        True, "127.0.0.1", 9400, "", "recbalance")
    cfg = load_config(None, ["metrics.port=0", "metrics.enabled=false", 'metrics.pushgateway="http://pg:9091"',
                             'metrics.run_id="r7"'])
    assert (cfg.metrics.port, cfg.metrics.enabled, cfg.metrics.pushgateway, cfg.metrics.run_id) == (0, False, "http://pg:9091", "r7")
    for override, message in [
        ("metrics.port=70000", "config key 'metrics.port': 70000 is not allowed; expected an integer from 0 to 65535"),
        ("metrics.port=-1", "config key 'metrics.port'"),
        ('metrics.pushgateway="pg:9091"', "config key 'metrics.pushgateway'"),
        ('metrics.host=""', "config key 'metrics.host'"),
        ('metrics.job=""', "config key 'metrics.job'"),
        ('metrics.enabled="yes"', "config key 'metrics.enabled'"),
        ("metrics.prot=1", "unknown config key 'metrics.prot'"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            load_config(None, [override])


def env(rank: int, local_rank: int | None = None) -> DistEnv:
    return DistEnv(rank=rank, world_size=2, local_rank=rank if local_rank is None else local_rank, device=torch.device("cpu"))


def test_make_sinks(tmp_path):
    off = load_config(None, ["metrics.enabled=false", "metrics.port=0"])
    sinks = make_sinks(off, env(0), tmp_path, HistorySink())
    assert [type(x) for x in sinks] == [TrainingPlot]  # disabled: no exporter, no server
    assert make_sinks(off, env(1), tmp_path, HistorySink()) == []
    on = load_config(None, ["metrics.port=0"])
    sinks = make_sinks(on, env(0), tmp_path, HistorySink())
    try:
        exporter = next(x for x in sinks if isinstance(x, PrometheusSink))
        assert exporter.exporting and exporter.port
        assert exporter.run_id  # generated
    finally:
        for x in sinks:
            x.close(None)
    assert make_sinks(on, env(1), tmp_path, HistorySink()) == []  # same node, other local rank: nothing


def plot_of(directory: Path, *reports) -> TrainingPlot:
    """A training plot over a history fed with these progress points and evaluations."""
    history = HistorySink()
    for report in reports:
        (history.on_eval if isinstance(report, Evaluation) else history.on_progress)(report)
    return TrainingPlot(directory, history)


def test_training_plot(tmp_path):
    plot = plot_of(tmp_path, *(progress(step, weights=(0.8 + step / 100, 1.2 - step / 100)) for step in (10, 20, 30)),
                   evaluation("test"))
    plot.close({"model": "mmoe", "method": "multibalance", "world_size": 2})
    png = tmp_path / PLOT_NAME
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width = matplotlib.image.imread(png).shape[:2]
    assert height > width * 0.6  # two panels (NE and weights)

    plot_of(tmp_path / "equal", progress(weights=None)).close(None)
    height, width = matplotlib.image.imread(tmp_path / "equal" / PLOT_NAME).shape[:2]
    assert height < width * 0.6  # weights panel skipped

    plot_of(tmp_path / "none", evaluation("test")).close(None)  # no progress point: nothing to draw
    assert not (tmp_path / "none").exists()


def test_training_plot_of_a_resumed_run_draws_the_earlier_segments(tmp_path, monkeypatch):
    import json

    import trainer.observe.plot as plot_module

    earlier = [progress(step).to_dict() for step in (10, 20, 30, 40)]
    (tmp_path / "history.json").write_text(json.dumps(earlier))
    history = HistorySink()
    assert history.restore(tmp_path / "history.json", 30) is None  # resumed from the checkpoint of step 30
    history.on_progress(progress(40))
    drawn = []
    real = plot_module.plot_training
    monkeypatch.setattr(plot_module, "plot_training", lambda points, *a: drawn.append([p["step"] for p in points])
                        or real(points, *a))
    TrainingPlot(tmp_path, history).close(None)
    assert drawn == [[10, 20, 30, 40]] and (tmp_path / PLOT_NAME).is_file()

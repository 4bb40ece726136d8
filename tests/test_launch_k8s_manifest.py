"""deploy/k8s/: the plain-Kubernetes (no Volcano) Indexed Job, its headless Service,
ConfigMap, volumes and PodMonitor — checked for internal consistency and against the real
torchrun and `recbalance train` argument parsers."""
from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from trainer.run.cli import build_parser

K8S = Path(__file__).resolve().parents[1] / "deploy" / "k8s"


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


@pytest.fixture(scope="module")
def objs() -> dict[str, dict]:
    docs = _docs("job.yaml")
    kinds = [d["kind"] for d in docs]
    assert sorted(kinds) == ["ConfigMap", "Job", "Service"]
    return {d["kind"]: d for d in docs}


def _container(job: dict) -> dict:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict) -> dict[str, object]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def _ports(container: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def _rendered_torchrun(container: dict, node_rank: str, tmp_path: Path) -> list[str]:
    """Run the container's bash script with a stand-in `torchrun` that prints its argv."""
    fake = tmp_path / "torchrun"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {k: str(v) for k, v in _env(container).items() if isinstance(v, str)}
    env.update(NODE_RANK=node_rank, PATH=f"{tmp_path}{os.pathsep}/usr/bin:/bin")
    assert container["command"] == ["bash", "-c"]
    out = subprocess.run(["bash", "-c", container["args"][0]], env=env, capture_output=True, text=True,
                         check=True, timeout=30)
    return out.stdout.splitlines()


def test_indexed_job_shape(objs: dict[str, dict]) -> None:
    job, svc = objs["Job"], objs["Service"]
    spec = job["spec"]
    env = _env(_container(job))
    nnodes = int(env["NNODES"])
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == nnodes >= 2
    assert spec["backoffLimit"] >= 1
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] in ("OnFailure", "Never")
    assert pod["terminationGracePeriodSeconds"] >= 30       # room for the SIGTERM checkpoint
    assert 0 < int(env["SHUTDOWN_TIMEOUT"]) < pod["terminationGracePeriodSeconds"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert env["JOB_NAME"] == job["metadata"]["name"]
    assert env["NODE_RANK"] == {"fieldRef": {
        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
    # headless Service that names the pods <job>-<index>.<service>
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert pod["subdomain"] == svc["metadata"]["name"]
    labels = spec["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert labels["app.kubernetes.io/name"] == "recbalance"


def test_rendezvous_and_ports(objs: dict[str, dict], tmp_path: Path) -> None:
    job, svc = objs["Job"], objs["Service"]
    container = _container(job)
    env, ports = _env(container), _ports(container)
    svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
    c10d = ports["c10d"]
    assert svc_ports["c10d"]["port"] == c10d and svc_ports["c10d"]["targetPort"] == "c10d"
    assert env["RDZV_ENDPOINT"] == f"{job['metadata']['name']}-0.{svc['metadata']['name']}:{c10d}"

    from torch.distributed.run import config_from_args, parse_args

    resources = container["resources"]
    for node_rank in ("0", "1"):
        argv = _rendered_torchrun(container, node_rank, tmp_path)
        args = parse_args(argv)                       # torchrun's own parser accepts every flag
        launch, _, cmd_args = config_from_args(args)
        assert args.module and args.training_script == "trainer.run.cli"
        assert cmd_args[-len(args.training_script_args) - 2:-len(args.training_script_args)] == ["-m", "trainer.run.cli"]
        train_argv = args.training_script_args
        assert launch.min_nodes == launch.max_nodes == job["spec"]["completions"]
        assert launch.nproc_per_node == int(env["NPROC_PER_NODE"])
        if "nvidia.com/gpu" in resources["limits"]:
            assert launch.nproc_per_node == int(resources["limits"]["nvidia.com/gpu"])
        assert launch.rdzv_backend == "c10d" and launch.rdzv_endpoint == env["RDZV_ENDPOINT"]
        assert launch.run_id == env["JOB_NAME"]
        assert launch.max_restarts == int(env["MAX_RESTARTS"])
        assert args.shutdown_timeout == int(env["SHUTDOWN_TIMEOUT"])
        assert launch.rdzv_configs["is_host"] == ("1" if node_rank == "0" else "0")   # pod 0 hosts the store

        train = build_parser().parse_args(train_argv)
        assert train.command == "train"
        assert train.output_dir == f"/runs/{env['JOB_NAME']}"
        assert f"metrics.port={ports['metrics']}" in train.overrides
        assert 'metrics.host="0.0.0.0"' in train.overrides


def test_config_map_mounted_and_valid(objs: dict[str, dict], tmp_path: Path) -> None:
    from trainer.config import load_config

    job, cm = objs["Job"], objs["ConfigMap"]
    container = _container(job)
    pod = job["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    argv = _rendered_torchrun(container, "0", tmp_path)
    train = build_parser().parse_args(argv[argv.index("-m") + 2:])
    config_dir, key = os.path.split(train.config)
    assert volumes[mounts[config_dir]]["configMap"]["name"] == cm["metadata"]["name"]
    assert key in cm["data"]
    (tmp_path / key).write_text(cm["data"][key])
    cfg = load_config(tmp_path / key, train.overrides)          # every key and value accepted
    assert cfg.data.path.startswith("/data/")
    assert mounts["/data"] == "data" and mounts["/runs"] == "runs" and mounts["/dev/shm"] == "dshm"
    claims = {d["metadata"]["name"] for d in _docs("volumes.yaml") if d["kind"] == "PersistentVolumeClaim"}
    assert {volumes["data"]["persistentVolumeClaim"]["claimName"],
            volumes["runs"]["persistentVolumeClaim"]["claimName"]} == claims


def test_metrics_scraping(objs: dict[str, dict]) -> None:
    job = objs["Job"]
    container = _container(job)
    port = _ports(container)["metrics"]
    assert int(_env(container)["METRICS_PORT"]) == port
    annotations = job["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and int(annotations["prometheus.io/port"]) == port
    (monitor,) = [d for d in yaml.safe_load_all((K8S.parent / "prometheus" / "podmonitor.yaml").read_text()) if d]
    assert monitor["kind"] == "PodMonitor"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]


def test_resources_and_threads(objs: dict[str, dict]) -> None:
    container = _container(objs["Job"])
    res = container["resources"]
    assert set(res["requests"]) == set(res["limits"])
    env = _env(container)
    cpus = int(res["limits"]["cpu"])
    assert int(env["OMP_NUM_THREADS"]) * int(env["NPROC_PER_NODE"]) <= cpus
    from launch.components import DEFAULT_IMAGE

    assert container["image"] == DEFAULT_IMAGE            # the Dockerfile's GPU build

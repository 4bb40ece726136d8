"""The torchx component (launch/components.py:train): its AppDef, and the Volcano job
torchx's kubernetes scheduler renders from it (dry run, no cluster needed)."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launch.components import APP_NAME, TRAIN_MODULE, torchrun_command, train
from trainer.run.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def _flag(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


def _train_words(words: list[str]) -> list[str]:
    """The `recbalance train ...` arguments after `torchrun ... -m trainer.run.cli`."""
    i = words.index("-m")
    assert words[i + 1] == TRAIN_MODULE
    return words[i + 2:]


def test_appdef_roles_command_and_resources() -> None:
    app = train("train.steps=100", "balance.method=multibalance", config="/cfg/run.toml",
                output_dir="/runs/a", j="3x4", image="reg.example/recbalance:0.1.0", cpu=16, gpu=4,
                memMB=65536, max_retries=2, max_restarts=5, shutdown_timeout=50, metrics_port=9401, env={"NCCL_DEBUG": "WARN"})
    assert app.name == APP_NAME
    (role,) = app.roles
    assert role.name == "trainer"
    assert role.num_replicas == 3 and role.min_replicas == 3
    assert role.image == "reg.example/recbalance:0.1.0"
    assert role.entrypoint == "bash" and role.args[0] == "-c"
    assert role.max_retries == 2
    assert (role.resource.cpu, role.resource.gpu, role.resource.memMB) == (16, 4, 65536)
    assert role.port_map == {"c10d": 29500, "metrics": 9401}
    assert role.env["OMP_NUM_THREADS"] == "4"          # 16 CPUs / 4 ranks
    assert role.env["NCCL_DEBUG"] == "WARN"

    words = torchrun_command(app)
    assert words[0] == "torchrun"
    assert _flag(words, "--nnodes") == "3"
    assert _flag(words, "--nproc_per_node") == "4"
    assert _flag(words, "--max_restarts") == "5"
    assert _flag(words, "--shutdown_timeout") == "50"
    assert _flag(words, "--rdzv_backend") == "c10d"
    assert _flag(words, "--rdzv_endpoint").endswith(":29500")
    from torch.distributed.run import parse_args

    parsed = parse_args(words[1:])                     # torchrun's own parser accepts it all
    assert parsed.module and parsed.training_script == TRAIN_MODULE
    assert (parsed.max_restarts, parsed.shutdown_timeout, parsed.nnodes) == (5, 50, "3")

    # What each rank runs parses with the real CLI and carries config, output and metrics.
    args = build_parser().parse_args(_train_words(words))
    assert args.command == "train"
    assert args.config == "/cfg/run.toml"
    assert args.output_dir == "/runs/a"
    assert args.overrides == ["metrics.port=9401", 'metrics.host="0.0.0.0"',
                              "train.steps=100", "balance.method=multibalance"]


def test_appdef_defaults_and_options() -> None:
    app = train(config="configs/synthetic.toml", j="1x2", metrics_port=0, threads_per_proc=3)
    (role,) = app.roles
    assert role.num_replicas == 1
    assert role.max_retries == 0
    assert role.port_map == {"c10d": 29500}              # port 0: trainer picks one, nothing exposed
    assert role.env["OMP_NUM_THREADS"] == "3"
    words = torchrun_command(app)
    assert _flag(words, "--max_restarts") == "0"
    assert _flag(words, "--rdzv_endpoint") == "localhost:0"   # single node: any free port
    assert "metrics.port=0" in _train_words(words)
    with pytest.raises(ValueError):
        train(config="c.toml", max_restarts=-1)
    with pytest.raises(ValueError):
        train(config="c.toml", metrics_port=70000)


def test_overrides_are_valid_config() -> None:
    """The overrides the component adds are accepted by the trainer's config loader."""
    from trainer.config import load_config

    words = torchrun_command(train(config=str(ROOT / "configs/synthetic.toml"), metrics_port=9400))
    args = build_parser().parse_args(_train_words(words))
    cfg = load_config(args.config, args.overrides)
    metrics = cfg.to_dict().get("metrics")
    if metrics is not None:
        assert metrics["port"] == 9400 and metrics["host"] == "0.0.0.0"


def _volcano_job(app) -> dict:
    from torchx.schedulers.kubernetes_scheduler import create_scheduler

    info = create_scheduler("test")._submit_dryrun(app, {"queue": "default"})
    return info.request.resource


def test_kubernetes_render_volcano_job() -> None:
    import warnings

    app = train("train.steps=10", config="/cfg/run.toml", output_dir="/runs/x", j="2x8",
                image="reg.example/recbalance:0.1.0", cpu=32, gpu=8, memMB=131072, max_retries=3,
                metrics_port=9400, mounts=["type=volume", "src=recbalance-runs", "dst=/runs"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchx warns that Volcano retries are imperfect
        job = _volcano_job(app)
    assert job["apiVersion"] == "batch.volcano.sh/v1alpha1" and job["kind"] == "Job"
    spec = job["spec"]
    assert spec["schedulerName"] == "volcano" and spec["queue"] == "default"
    assert spec["maxRetry"] == 3
    tasks = spec["tasks"]
    assert [t["name"] for t in tasks] == ["trainer-0", "trainer-1"]   # one task per node
    for i, task in enumerate(tasks):
        assert task["replicas"] == 1 and task["maxRetry"] == 3
        pod = task["template"]
        assert pod.metadata.labels["app.kubernetes.io/name"] == "recbalance"   # PodMonitor selector
        (container,) = pod.spec.containers
        assert container.image == "reg.example/recbalance:0.1.0"
        limits = container.resources.limits
        assert limits["cpu"] == "32000m" and limits["memory"] == "131072M" and limits["nvidia.com/gpu"] == "8"
        assert container.resources.requests["nvidia.com/gpu"] == "8"
        assert {p.name: p.container_port for p in container.ports} == {"c10d": 29500, "metrics": 9400}
        env = {e.name: e.value for e in container.env}
        assert env["OMP_NUM_THREADS"] == "4" and env["PYTHONUNBUFFERED"] == "1"
        assert container.command[:2] == ["bash", "-c"]
        words = shlex.split(container.command[2])
        assert _flag(words, "--nnodes") == "2" and _flag(words, "--nproc_per_node") == "8"
        # node 0 hosts the rendezvous store; the others find it through Volcano's host env
        endpoint = _flag(words, "--rdzv_endpoint")
        assert endpoint == ("${TORCHX_RANK0_HOST:=localhost}:29500" if i == 0 else "${VC_TRAINER_0_HOSTS:=localhost}:29500")
        assert build_parser().parse_args(_train_words(words)).output_dir == "/runs/x"
        mounts = {m.mount_path: m.name for m in container.volume_mounts}
        assert "/runs" in mounts
        claims = {v.name: v.persistent_volume_claim.claim_name for v in pod.spec.volumes if v.persistent_volume_claim}
        assert claims[mounts["/runs"]] == "recbalance-runs"


def test_torchx_cli_dryrun_with_repo_torchxconfig() -> None:
    """`torchx run --dryrun -s kubernetes` from the repository root: .torchxconfig supplies the
    component, the queue and the empty workspace (no image build)."""
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchx"), "run", "--dryrun", "-s", "kubernetes", "--",
           "--config", "/cfg/run.toml", "-j", "4x2", "--gpu", "2", "--image", "reg.example/recbalance:0.1.0",
           "--max_retries", "1", "train.steps=5"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    marker = "=== SCHEDULER REQUEST ==="
    assert marker in out.stdout, out.stdout
    job = yaml.safe_load(out.stdout.split(marker, 1)[1])
    spec = job["spec"]
    assert spec["queue"] == "default" and spec["maxRetry"] == 1
    assert len(spec["tasks"]) == 4
    container = spec["tasks"][3]["template"]["spec"]["containers"][0]
    assert container["image"] == "reg.example/recbalance:0.1.0"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"c10d": 29500, "metrics": 9400}
    words = shlex.split(container["command"][2])
    assert _flag(words, "--nnodes") == "4" and "train.steps=5" in words

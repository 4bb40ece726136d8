"""torchx components for recbalance.

``train`` runs ``recbalance train`` (the module ``trainer.run.cli``) under torchrun through
torchx's ``dist.ddp``, so the same command starts a job on this machine
(``-s local_cwd``), on a Kubernetes cluster with Volcano (``-s kubernetes``) or on any
other torchx scheduler::

    torchx run -s local_cwd launch/components.py:train --config configs/synthetic.toml -j 1x2
    torchx run -s kubernetes -cfg queue=default launch/components.py:train \\
        --image ghcr.io/example/recbalance:0.1.0 --config /data/run.toml -j 4x8 --gpu 8

Every rank is one ``recbalance train`` process started by torchrun; the trainer sees
TORCHELASTIC_RUN_ID / RANK / WORLD_SIZE and joins the job (NCCL on GPU, gloo on CPU).
"""
import shlex
from typing import Dict, List, Optional, Tuple

import torchx.specs as specs
from torchx.components.dist import ddp, parse_nnodes

#: the module every rank runs (``python -m trainer.run.cli train ...``); the console script
#: ``recbalance`` is the same function.
TRAIN_MODULE = "trainer.run.cli"
#: the image built from this repository's Dockerfile.
DEFAULT_IMAGE = "recbalance:0.1.0"
#: port of the Prometheus exporter (rank 0 serves it): `metrics.port` in the run config
#: and the container port named ``metrics``.
DEFAULT_METRICS_PORT = 9400
#: `metrics.host`: all interfaces, so that Prometheus can reach the exporter in a pod.
DEFAULT_METRICS_HOST = "0.0.0.0"
#: port of the c10d rendezvous store on the rank-0 node (multi-node jobs).
DEFAULT_RDZV_PORT = 29500
#: the app name; torchx's kubernetes scheduler puts it in the pod label
#: ``app.kubernetes.io/name``, which the PodMonitor selects.
APP_NAME = "recbalance"


def train_args(
    config: str,
    output_dir: str,
    overrides: Tuple[str, ...] = (),
    metrics_port: int = DEFAULT_METRICS_PORT,
    metrics_host: str = DEFAULT_METRICS_HOST,
) -> List[str]:
    """Arguments of ``recbalance train`` (after the program name) for one rank. The metrics
    settings come first so that explicit overrides (``metrics.enabled=false`` ...) win."""
    args = ["train", "--config", config, "--output-dir", output_dir,
            "--set", f"metrics.port={int(metrics_port)}", "--set", f"metrics.host={_toml_str(metrics_host)}"]
    for override in overrides:
        args += ["--set", override]
    return args


def _toml_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def train(
    *overrides: str,
    config: str = "configs/synthetic.toml",
    output_dir: str = "runs/torchx",
    j: str = "1x2",
    image: str = DEFAULT_IMAGE,
    name: str = APP_NAME,
    h: Optional[str] = None,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 4096,
    max_retries: int = 0,
    max_restarts: int = 0,
    shutdown_timeout: int = 25,
    metrics_port: int = DEFAULT_METRICS_PORT,
    metrics_host: str = DEFAULT_METRICS_HOST,
    rdzv_port: int = DEFAULT_RDZV_PORT,
    threads_per_proc: int = 0,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Train a recbalance multi-task ranking model: ``recbalance train`` on every rank,
    started by torchrun on each of the job's nodes.

    Args:
        overrides: config overrides ``section.key=value``, each passed as ``--set``
            (e.g. ``train.steps=1000 balance.method=multibalance``)
        config: TOML run configuration, a path inside the image / working directory
        output_dir: where summary.json, checkpoints and the run's files go (a shared
            volume for multi-node jobs)
        j: ``{nnodes}x{nproc_per_node}`` (or ``{min_nnodes}:{nnodes}x{nproc_per_node}``),
            e.g. ``4x8`` for 4 nodes with 8 GPUs each
        image: container image built from the repository's Dockerfile
            (ignored by local_cwd)
        name: job name (``{experiment}/{run}``); the run name labels the pods
            ``app.kubernetes.io/name``
        h: a registered torchx named resource; takes precedence over cpu, gpu, memMB
        cpu: CPUs per node (pod)
        gpu: GPUs per node (pod); with GPUs the trainer uses NCCL, otherwise gloo
        memMB: memory per node (pod) in MB
        max_retries: scheduler retries of the whole job (Kubernetes/Volcano: the job's
            and each task's maxRetry)
        max_restarts: in-place restarts of the worker group by torchrun on a rank failure;
            the trainer resumes from its newest complete checkpoint
        shutdown_timeout: seconds torchrun gives the ranks after forwarding SIGTERM
            (preemption) before SIGKILL, time to save a checkpoint; keep it below the pod's
            termination grace period (Kubernetes default 30 s)
        metrics_port: port of the Prometheus exporter, served by rank 0
            (``--set metrics.port``), exposed as the container port ``metrics``; 0 lets the
            trainer pick a free port (not exposed)
        metrics_host: address the exporter listens on (``--set metrics.host``);
            ``127.0.0.1`` keeps it private on a shared machine
        rdzv_port: port of the c10d rendezvous store on the first node (multi-node)
        threads_per_proc: OMP_NUM_THREADS of each rank; 0 means cpu // nproc_per_node
            (torch's own intra-op threads are the config's ``train.threads_per_rank``)
        env: extra environment variables (``K1=v1,K2=v2``)
        mounts: volumes to mount, e.g. ``type=volume,src=recbalance-runs,dst=/runs``
            (kubernetes: that PersistentVolumeClaim) or ``type=bind,src=/host,dst=/data``;
            several: ``type=volume,src=a,dst=/a,type=volume,src=b,dst=/b,readonly``
    """
    _, _, nproc_per_node, _ = parse_nnodes(j)
    if max_restarts < 0 or max_retries < 0 or shutdown_timeout < 0:
        raise ValueError("max_restarts, max_retries and shutdown_timeout must be >= 0")
    if not 0 <= metrics_port <= 65535:
        raise ValueError(f"metrics_port: {metrics_port} is not a port number")

    job_env: Dict[str, str] = {}
    threads = threads_per_proc if threads_per_proc > 0 else max(1, cpu // max(1, nproc_per_node))
    job_env["OMP_NUM_THREADS"] = str(threads)
    job_env["PYTHONUNBUFFERED"] = "1"
    job_env.update(env or {})

    app = ddp(
        *train_args(config, output_dir, overrides, metrics_port, metrics_host),
        m=TRAIN_MODULE,
        image=image,
        name=name,
        h=h,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=j,
        env=job_env,
        max_retries=max_retries,
        rdzv_port=rdzv_port,
        mounts=mounts,
    )
    role = app.roles[0]
    role.name = "trainer"
    cmd = role.args[-1]
    if not cmd.startswith("torchrun "):  # ddp's contract: bash -c "torchrun ..."
        raise RuntimeError(f"unexpected dist.ddp command: {cmd!r}")
    # torchrun restarts the worker group in place (no new pod) and forwards SIGTERM to the
    # ranks; dist.ddp has no options for either.
    role.args[-1] = (f"torchrun --max_restarts {int(max_restarts)} --shutdown_timeout {int(shutdown_timeout)} "
                     + cmd[len("torchrun "):])
    if metrics_port > 0:
        role.port_map["metrics"] = metrics_port
    return app


def torchrun_command(app: specs.AppDef) -> List[str]:
    """The torchrun command line of the app's (single) role, split into words."""
    return shlex.split(app.roles[0].args[-1])


__all__ = ["train", "train_args", "torchrun_command", "TRAIN_MODULE", "DEFAULT_METRICS_PORT", "DEFAULT_METRICS_HOST", "APP_NAME"]
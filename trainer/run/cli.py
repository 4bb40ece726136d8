"""`recbalance` command line: train, data."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from trainer.bench.cli import add_bench_commands, run_bench_command
from trainer.core.checkpoint import CheckpointRefusedError
from trainer.config import ConfigError, load_config
from trainer.datasets.cli import add_data_commands, run_data_command
from trainer.data.errors import DataError


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a multi-task ranking model")
    p.add_argument("--config", required=True, help="TOML run configuration")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable)")
    p.add_argument("--output-dir", required=True, help="where summary.json and the run's files go")
    p.add_argument("--nproc-per-node", type=int, default=1,
                   help="local ranks to start (ignored when already started by torchrun/torchx)")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="restart all local ranks this often after a failure; each restart resumes "
                        "from the newest checkpoint")
    p.add_argument("--fresh", action="store_true",
                   help="start at step 0 even if the output directory holds checkpoints (same as --set "
                        "checkpoint.resume=false); they are moved to CHECKPOINT_DIR/previous-<time>/, never deleted")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recbalance", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    add_data_commands(sub)
    add_bench_commands(sub)
    return parser


def train(args: argparse.Namespace) -> int:
    from trainer.run.preflight import preflight
    from trainer.observe.report import format_summary
    from trainer.run.worker import run_worker, under_launcher

    cfg = load_config(args.config, [*args.overrides, *(["checkpoint.resume=false"] if args.fresh else [])])
    if args.nproc_per_node < 1:
        raise ConfigError(f"--nproc-per-node: {args.nproc_per_node} is not allowed; expected an integer >= 1")
    if under_launcher():
        summary = run_worker(cfg.to_dict(), args.output_dir)
        if os.environ.get("RANK", "0") != "0":
            return 0
    else:
        preflight(cfg, world_size=args.nproc_per_node)
        from trainer.run.launcher import launch_local

        summary = launch_local(cfg.to_dict(), args.output_dir, args.nproc_per_node, args.max_restarts)
    print(format_summary(summary, Path(args.output_dir)), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            return train(args)
        if args.command == "bench":
            return run_bench_command(args)
        return run_data_command(args)
    except (ConfigError, DataError) as err:
        print(f"recbalance: error: {err}", file=sys.stderr)
        return 2
    except ChildFailedError as err:
        print(f"recbalance: error: {root_cause(err)}", file=sys.stderr)
        return 1
    except CheckpointRefusedError as err:  # raised in this process when it is one rank under torchrun
        print(f"recbalance: error: {err}", file=sys.stderr)
        return 1
    except SignalException as stop:
        print(f"recbalance: stopped by signal {stop.sigval.name}; the ranks checkpoint before exiting, "
              "rerun the same command to resume", file=sys.stderr)
        return 128 + int(stop.sigval)


def root_cause(err: ChildFailedError) -> str:
    """The first failing rank's whole error message, once (the launcher's wall of tracebacks
    is not shown; see trainer/run/launcher.py)."""
    rank, failure = err.get_first_failure()
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    text = str(message).strip()
    return f"rank {rank} failed: {text or f'exit code {failure.exitcode}'}"


if __name__ == "__main__":
    sys.exit(main())

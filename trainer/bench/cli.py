"""`recbalance bench qps|quality|compare`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from trainer.config import ConfigError, load_config


def add_bench_commands(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks: QPS and test quality of balancing methods, regression gate")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    q = bsub.add_parser("qps", help="QPS of methods and levels side by side in one process, interleaved")
    q.add_argument("--config", required=True)
    q.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    q.add_argument("--methods", default="equal,multibalance,cograd")
    q.add_argument("--levels", default="representation,parameters")
    q.add_argument("--variants", default="",
                   help="explicit method@level list (overrides --methods/--levels), e.g. "
                        "equal@representation,multibalance@parameters")
    q.add_argument("--rounds", type=int, default=10)
    q.add_argument("--steps-per-round", type=int, default=20)
    q.add_argument("--warmup-rounds", type=int, default=2)
    q.add_argument("--threads", type=int, default=1)
    q.add_argument("--output-dir", required=True)
    ql = bsub.add_parser("quality", help="test AUC/NE of methods over seeds against equal weights, "
                                         "with a paired t-test; resumable")
    ql.add_argument("--config", required=True)
    ql.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ql.add_argument("--methods", required=True,
                    help="comma-separated NAME or NAME:KEY=VALUE;KEY=VALUE items, e.g. "
                         "'equal,multibalance,multibalance:ema=false' (equal is always added as the reference)")
    ql.add_argument("--seeds", type=int, required=True, help="trainings per method, seeds SEED_BASE..SEED_BASE+N-1")
    ql.add_argument("--seed-base", type=int, default=0)
    ql.add_argument("--nproc-per-node", type=int, default=1, help="local ranks per training")
    ql.add_argument("--max-restarts", type=int, default=0, help="restarts per training after a failure")
    ql.add_argument("--noise-floor", action="store_true",
                    help="also train equal weights with the gradient halved (the same training in exact arithmetic "
                         "under Adam/Adagrad): how far float rounding alone moves the comparison")
    ql.add_argument("--output-dir", required=True,
                    help="quality.json/.md/.png; every training in OUTPUT_DIR/cells/VARIANT/seed-K (reused on rerun)")
    c = bsub.add_parser("compare", help="QPS-regression gate: exit 1 when the candidate is slower beyond --max-drop, "
                                        "2 when an input is missing or malformed")
    c.add_argument("--baseline", required=True)
    c.add_argument("--candidate", required=True)
    c.add_argument("--max-drop", type=float, required=True, help="allowed QPS drop in percent")
    c.add_argument("--pushgateway", default="", help="also push the comparison to this Pushgateway URL")


def _variants(args: argparse.Namespace):
    from trainer.bench.qps import Variant

    if args.variants:
        pairs = [item.split("@") for item in args.variants.split(",")]
        if any(len(p) != 2 for p in pairs):
            raise ConfigError(f"--variants {args.variants!r}: expected method@level items separated by commas")
        variants = [Variant(m, lvl) for m, lvl in pairs]
    else:
        variants = [Variant(m, lvl) for lvl in args.levels.split(",") for m in args.methods.split(",")]
    for v in variants:
        if v.level not in ("representation", "parameters"):
            raise ConfigError(f"level {v.level!r} is not allowed; expected 'representation' or 'parameters'")
    reference = Variant("equal", "representation")
    if reference not in variants:
        variants.insert(0, reference)  # the ratio's denominator is always measured
    return variants


def _report(path: str, flag: str) -> object:
    """The JSON in `path`; a missing, unreadable or malformed file raises ValueError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{flag} {path}: cannot read a JSON report ({type(err).__name__}: {err})") from None


def run_bench_command(args: argparse.Namespace) -> int:
    from trainer.bench.qps import compare, format_table, measure, write_report

    if args.bench_command == "compare":
        try:
            rows, ok = compare(_report(args.baseline, "--baseline"), _report(args.candidate, "--candidate"),
                               args.max_drop)
        except ValueError as err:  # bad input: exit 2, distinct from the gate's 1 for a QPS drop
            print(f"recbalance: error: bench compare: {err}", file=sys.stderr)
            return 2
        print(f"{'method':<14} {'level':<15} {'baseline':>10} {'candidate':>10} {'drop':>8}")
        for r in rows:
            flag = "  FAIL" if r["failed"] else ""
            print(f"{r['method']:<14} {r['level']:<15} {r['baseline_qps']:>10,.0f} {r['candidate_qps']:>10,.0f} "
                  f"{r['drop_pct']:>7.2f}%{flag}")
        print("QPS gate: " + ("passed" if ok else f"FAILED (allowed drop {args.max_drop}%)"))
        if args.pushgateway:
            from trainer.bench.qps import push_comparison

            try:
                push_comparison(args.pushgateway, rows)
                print(f"pushed to {args.pushgateway}")
            except OSError as err:  # the gate's verdict stands even when the push fails
                print(f"warning: could not push to {args.pushgateway}: {err}", file=sys.stderr)
        return 0 if ok else 1
    if args.bench_command == "quality":
        from trainer.bench.quality import run_quality

        return run_quality(args)
    from trainer.run.allocator import keep_freed_memory
    from trainer.run.preflight import preflight
    from trainer.run.worker import quiet_libraries

    cfg = load_config(args.config, args.overrides)
    variants = _variants(args)
    for v in variants:
        from trainer.bench.qps import variant_config

        preflight(variant_config(cfg.to_dict(), v), world_size=1)
    quiet_libraries()
    tuned = keep_freed_memory()
    torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    rows = measure(cfg.to_dict(), variants, args.rounds, args.steps_per_round, args.warmup_rounds, out / "runs")
    meta = {"global_batch_size": cfg.data.global_batch_size, "model": cfg.model.kind, "threads": args.threads,
            "rounds": args.rounds, "steps_per_round": args.steps_per_round, "warmup_rounds": args.warmup_rounds,
            "torch": torch.__version__, "keep_freed_memory": tuned}
    write_report(rows, meta, out)
    print(format_table(rows, meta))
    print(f"\nwritten: {out / 'qps.json'}, {out / 'qps.md'}, {out / 'qps.png'}")
    return 0

"""`python -m trainer.observe baseline --summary RUN/summary.json --pushgateway URL`:
store a run's QPS as the baseline its method, model, level and world size are compared
against (series `recbalance_qps_baseline`, read by deploy/prometheus/rules)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trainer.observe.prometheus import push_baseline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.observe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("baseline", help="push a run's QPS as the QPS baseline")
    p.add_argument("--summary", required=True, help="summary.json of the baseline run")
    p.add_argument("--pushgateway", required=True, help="Pushgateway URL, e.g. http://127.0.0.1:9091")
    p.add_argument("--job", default="recbalance-baseline", help="Pushgateway job of the baseline groups")
    p.add_argument("--qps", type=float, default=None, help="use this QPS instead of the summary's")
    args = parser.parse_args(argv)
    try:
        summary = json.loads(Path(args.summary).read_text())
    except (OSError, ValueError) as err:
        print(f"recbalance: error: cannot read {args.summary}: {err}", file=sys.stderr)
        return 2
    try:
        labels = push_baseline(args.pushgateway, summary, job=args.job, qps=args.qps)
    except Exception as err:
        print(f"recbalance: error: could not push the baseline to {args.pushgateway}: {err}", file=sys.stderr)
        return 1
    print(f"QPS baseline {args.qps or summary['qps']:,.0f} stored for " + ", ".join(f"{k}={v}" for k, v in labels.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

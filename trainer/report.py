"""The end-of-run table a person reads."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def format_summary(summary: dict[str, Any], output_dir: Path) -> str:
    tasks = summary["tasks"]
    width = max(len("task"), *(len(t) for t in tasks))
    lines = [
        f"recbalance: {summary['model']} / {summary['method']} on {summary['world_size']} rank(s), "
        f"{summary['steps']} steps at global batch {summary['global_batch_size']}",
        "",
        f"{'task':<{width}}  {'NE':>8}  {'AUC':>8}  {'loss':>8}   ({summary['eval_split']} split)",
    ]
    for task, m in tasks.items():
        lines.append(f"{task:<{width}}  {m['ne']:>8.4f}  {m['auc']:>8.4f}  {m['loss']:>8.4f}")
    if summary.get("weights"):
        lines += ["", "final task weights: " + ", ".join(f"{t}={w:.3f}" for t, w in summary["weights"].items())]
    lines += [
        "",
        f"QPS (training examples/s, all ranks, after warm-up): {summary['qps']:,.0f}",
        f"run files: {output_dir.resolve()}  (summary.json, history.json, config.json)",
    ]
    return "\n".join(lines)

"""The end-of-run table a person reads."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def _run_files(output_dir: Path) -> list[str]:
    known = ("summary.json", "history.json", "config.json", "training.png", "checkpoints")
    return [name for name in known if (output_dir / name).exists()]


def format_summary(summary: dict[str, Any], output_dir: Path) -> str:
    tasks = summary["tasks"]
    width = max(len("task"), *(len(t) for t in tasks))
    columns = [c for c in ("ne", "auc", "gauc", "loss") if all(c in m for m in tasks.values())]
    header = "  ".join(f"{c.upper() if c != 'loss' else c:>8}" for c in columns)
    lines = [
        f"recbalance: {summary['model']} / {summary['method']} on {summary['world_size']} rank(s), "
        f"{summary['steps']} steps at global batch {summary['global_batch_size']}",
        "",
        f"{'task':<{width}}  {header}   ({summary['eval_split']} split)",
    ]
    for task, m in tasks.items():
        lines.append(f"{task:<{width}}  " + "  ".join(f"{m[c]:>8.4f}" for c in columns))
    if summary.get("weights"):
        lines += ["", "final task weights: " + ", ".join(f"{t}={w:.3f}" for t, w in summary["weights"].items())]
    lines += [
        "",
        f"QPS (training examples/s, all ranks, after warm-up): {summary['qps']:,.0f}",
        f"run files: {output_dir.resolve()}  ({', '.join(_run_files(output_dir))})",
    ]
    return "\n".join(lines)

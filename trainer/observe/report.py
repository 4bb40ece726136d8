"""The end-of-run table a person reads, and the strict JSON the run's files are written in."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def finite_or_none(value: Any) -> Any:
    """`value` with every float that is not finite (NaN, +-inf) replaced by None, in nested
    dicts, lists and tuples: JSON has no such numbers, and a bare NaN breaks strict parsers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def write_json(path: Path, value: Any, indent: int = 2) -> None:
    """Write `value` as strict JSON (RFC 8259): non-finite numbers become null."""
    path.write_text(json.dumps(finite_or_none(value), indent=indent, allow_nan=False) + "\n")


def _run_files(output_dir: Path) -> list[str]:
    known = ("summary.json", "history.json", "config.json", "training.png", "checkpoints")
    return [name for name in known if (output_dir / name).exists()]


def _number(value: float | None, spec: str, width: int = 8) -> str:
    """A metric for the table; '-' where it is missing (null in summary.json, or NaN)."""
    if value is None or not math.isfinite(value):
        return f"{'-':>{width}}"
    return f"{value:>{width}{spec}}"


def _skipped_line(skipped: Any) -> list[str]:
    """Bad rows left out (data.bad_rows = "skip"), per split; nothing when there were none."""
    if not isinstance(skipped, dict) or not any(skipped.values()):
        return []
    counts = ", ".join(f"{split} {n:,}" for split, n in skipped.items())
    return ["", f"bad rows skipped (data.bad_rows = \"skip\"), left out of training and of the metrics: {counts}"]


def _qps_line(summary: dict[str, Any]) -> str:
    qps = summary.get("qps")
    if qps is None or not math.isfinite(qps):
        return f"QPS (training examples/s): {summary.get('qps_note', 'not measured')}"
    return f"QPS (training examples/s, all ranks, after warm-up): {qps:,.0f}"


def _balance_columns(summary: dict[str, Any]) -> list[tuple[str, dict[str, float], str]]:
    """(header, value per task, format) of the balancer's columns that summary.json holds."""
    out = []
    if summary.get("weights"):
        out.append(("weight", summary["weights"], ".3f"))
    if summary.get("grad_norms"):
        out.append(("grad norm", summary["grad_norms"], ".2e"))
    return out


def _cosine_lines(cosines: Any) -> list[str]:
    """The task pairs' gradient cosines at the balance point: < 0 is conflict."""
    if not cosines:
        return []
    def signed(value: Any) -> str:
        return "-" if value is None or not math.isfinite(value) else f"{value:+.3f}"

    pairs = ", ".join(f"{pair} {signed(c.get('last'))} (mean {signed(c.get('mean'))})" for pair, c in cosines.items())
    return ["", f"gradient cosines at the balance point, last step (mean over training): {pairs}"]


_COLUMN_TITLES = {"loss": "loss", "calibration": "calib"}  # calib: sum of predictions / sum of labels


def format_summary(summary: dict[str, Any], output_dir: Path) -> str:
    tasks = summary["tasks"]
    width = max(len("task"), *(len(t) for t in tasks))
    columns = [c for c in ("ne", "auc", "gauc", "loss", "calibration") if all(c in m for m in tasks.values())]
    balance = _balance_columns(summary)
    header = "  ".join(f"{_COLUMN_TITLES.get(c, c.upper()):>8}" for c in columns)
    header += "".join(f"  {name:>9}" for name, _, _ in balance)
    lines = [
        f"recbalance: {summary['model']} / {summary['method']} on {summary['world_size']} rank(s), "
        f"{summary['steps']} steps at global batch {summary['global_batch_size']}",
        "",
        f"{'task':<{width}}  {header}   ({summary['eval_split']} split; weights and gradient norms: last step)",
    ]
    for task, m in tasks.items():
        row = "  ".join(_number(m[c], ".4f") for c in columns)
        row += "".join(f"  {_number(values.get(task), spec, 9)}" for _, values, spec in balance)
        lines.append(f"{task:<{width}}  {row}")
    lines += _cosine_lines(summary.get("cosines"))
    lines += _skipped_line(summary.get("skipped_rows"))
    lines += [
        "",
        _qps_line(summary),
        f"run files: {output_dir.resolve()}  ({', '.join(_run_files(output_dir))})",
    ]
    return "\n".join(lines)

"""QPS of balancing methods side by side in ONE process: every variant (method x level)
gets its own model, and the variants take turns in interleaved rounds so that the
machine's drift hits all of them alike. Medians over the measured steps, warm-up rounds
excluded; only the training step is timed (data loading is not)."""
from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from trainer.config import Config, config_from_dict
from trainer.run.distributed import init_distributed, shutdown_distributed
from trainer.core.trainer import Trainer


@dataclass
class Variant:
    method: str
    level: str

    @property
    def name(self) -> str:
        return f"{self.method}@{self.level}"


@dataclass
class QpsRow:
    method: str
    level: str
    steps_measured: int
    median_step_ms: float
    min_step_ms: float
    max_step_ms: float
    qps: float
    qps_ratio: float  # to equal weights at the representation level (no balancing work)
    balance_share: float  # time inside the balance point / step time
    balance_median_us: float  # median time inside the balance point per step
    round_median_ms: list[float]  # median step of each measured round
    paired_ratio: float  # median over rounds of (equal's round median / this round median)
    paired_ratio_q1: float  # quartiles of those per-round ratios: the spread drift leaves
    paired_ratio_q3: float


def variant_config(base: dict[str, Any], variant: Variant) -> Config:
    raw = json.loads(json.dumps(base))
    raw.setdefault("balance", {}).update(method=variant.method, level=variant.level)
    return config_from_dict(raw)


def measure(
    base: dict[str, Any], variants: list[Variant], rounds: int, steps_per_round: int, warmup_rounds: int,
    output_dir: Path, log=print,
) -> list[QpsRow]:
    """Run the interleaved rounds; returns one row per variant."""
    env = init_distributed()
    try:
        trainers = {v.name: Trainer(variant_config(base, v), env, output_dir / v.name) for v in variants}
        times: dict[str, list[float]] = {v.name: [] for v in variants}
        balance: dict[str, list[float]] = {v.name: [] for v in variants}
        rounds_ms: dict[str, list[float]] = {v.name: [] for v in variants}
        for r in range(warmup_rounds + rounds):
            order = variants[r % len(variants):] + variants[: r % len(variants)]  # rotate who goes first
            for v in order:
                trainer = trainers[v.name]
                for _ in range(steps_per_round):
                    batch = next(trainer.stream)
                    started = time.perf_counter()
                    result = trainer.train_step(batch)
                    elapsed = time.perf_counter() - started
                    if r >= warmup_rounds:
                        times[v.name].append(elapsed)
                        balance[v.name].append(result.balance_seconds)
                if r >= warmup_rounds:
                    rounds_ms[v.name].append(1e3 * statistics.median(times[v.name][-steps_per_round:]))
            phase = "warm-up" if r < warmup_rounds else "measured"
            log(f"round {r + 1}/{warmup_rounds + rounds} ({phase}): " + "  ".join(
                f"{v.name} {1e3 * statistics.median(times[v.name]):.2f}ms" for v in variants if times[v.name]
            ), flush=True)
    finally:
        shutdown_distributed()
    batch_size = base["data"]["global_batch_size"]
    reference = Variant("equal", "representation").name
    medians = {name: statistics.median(t) for name, t in times.items()}
    rows = []
    for v in variants:
        t = times[v.name]
        ratios = paired_ratios(rounds_ms[reference], rounds_ms[v.name]) if reference in rounds_ms else [float("nan")]
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else (ratios[0],) * 3
        rows.append(QpsRow(
            method=v.method, level=v.level, steps_measured=len(t),
            median_step_ms=1e3 * medians[v.name], min_step_ms=1e3 * min(t), max_step_ms=1e3 * max(t),
            qps=batch_size / medians[v.name],
            qps_ratio=medians[reference] / medians[v.name] if reference in medians else float("nan"),
            balance_share=sum(balance[v.name]) / sum(t),
            balance_median_us=1e6 * statistics.median(balance[v.name]),
            round_median_ms=rounds_ms[v.name], paired_ratio=statistics.median(ratios),
            paired_ratio_q1=q1, paired_ratio_q3=q3,
        ))
    return rows


def paired_ratios(reference_ms: list[float], variant_ms: list[float]) -> list[float]:
    """Per-round QPS ratio to the reference: the variants share each round's machine state,
    so the round-to-round drift (here +-30%) cancels in the ratio."""
    return [ref / own for ref, own in zip(reference_ms, variant_ms)]


def write_report(rows: list[QpsRow], meta: dict[str, Any], output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "qps.json").write_text(json.dumps({**meta, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    (output_dir / "qps.md").write_text(format_table(rows, meta) + "\n")
    plot(rows, output_dir / "qps.png")


def format_table(rows: list[QpsRow], meta: dict[str, Any]) -> str:
    lines = [
        f"QPS at global batch {meta['global_batch_size']}, model {meta['model']}, {meta['threads']} thread(s), "
        f"{meta['rounds']} measured rounds x {meta['steps_per_round']} steps (medians)",
        "",
        "| method | level | median step (ms) | min / max (ms) | QPS | QPS / equal | paired per round [q1, q3] "
        "| time in balance point | per step (µs) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r.method} | {r.level} | {r.median_step_ms:.2f} | {r.min_step_ms:.2f} / {r.max_step_ms:.2f} | "
            f"{r.qps:,.0f} | {r.qps_ratio:.3f} | {r.paired_ratio:.3f} [{r.paired_ratio_q1:.3f}, "
            f"{r.paired_ratio_q3:.3f}] | {100 * r.balance_share:.2f}% | {r.balance_median_us:,.0f} |"
        )
    return "\n".join(lines)


def plot(rows: list[QpsRow], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(rows)), 3.2))
    labels = [f"{r.method}\n{r.level[:5]}" for r in rows]
    ratios = [r.paired_ratio for r in rows]
    spread = [[r.paired_ratio - r.paired_ratio_q1 for r in rows], [r.paired_ratio_q3 - r.paired_ratio for r in rows]]
    ax.bar(labels, ratios, yerr=spread, capsize=3,
           color=["C0" if r.level == "representation" else "C3" for r in rows])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("QPS / equal (per round)")
    ax.set_title("QPS ratio to equal weights: median, quartiles")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def qps_rows(report: Any, name: str) -> list[dict[str, Any]]:
    """The rows of a qps.json report, each with a method, a level and a positive finite QPS;
    raises ValueError naming `name` and what is wrong."""
    rows = report.get("rows") if isinstance(report, dict) else None
    if not isinstance(rows, list):
        raise ValueError(f"{name}: not a `recbalance bench qps` report (no list of rows)")
    for i, r in enumerate(rows):
        ok = isinstance(r, dict) and isinstance(r.get("method"), str) and isinstance(r.get("level"), str)
        qps = r.get("qps") if ok else None
        if not (isinstance(qps, (int, float)) and not isinstance(qps, bool) and math.isfinite(qps) and qps > 0):
            got = f"qps {qps!r}" if ok else "no method and level" if isinstance(r, dict) else f"a {type(r).__name__}"
            raise ValueError(f"{name}: row {i} needs a method, a level and a positive qps; it has {got}")
    return rows


def compare(baseline: dict[str, Any], candidate: dict[str, Any], max_drop_pct: float) -> tuple[list[dict[str, Any]], bool]:
    """Match rows by (method, level); a row fails when its QPS dropped by more than max_drop_pct."""
    base = {(r["method"], r["level"]): r for r in qps_rows(baseline, "baseline")}
    out, ok = [], True
    for r in qps_rows(candidate, "candidate"):
        key = (r["method"], r["level"])
        if key not in base:
            continue
        drop = 100.0 * (1.0 - r["qps"] / base[key]["qps"])
        failed = drop > max_drop_pct
        ok &= not failed
        out.append({"method": key[0], "level": key[1], "baseline_qps": base[key]["qps"], "candidate_qps": r["qps"],
                    "drop_pct": drop, "failed": failed})
    if not out:
        raise ValueError("baseline and candidate share no (method, level) row to compare")
    return out, ok


def push_comparison(gateway: str, rows: list[dict[str, Any]], job: str = "recbalance-qps-gate") -> None:
    """Push the gate's rows to a Pushgateway (one group per job), so the QPS-regression
    dashboard shows the comparison next to the training runs."""
    from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

    registry = CollectorRegistry()
    labels = ["method", "level"]
    baseline = Gauge("recbalance_qps_gate_baseline", "QPS of the baseline run", labels, registry=registry)
    candidate = Gauge("recbalance_qps_gate_candidate", "QPS of the candidate run", labels, registry=registry)
    drop = Gauge("recbalance_qps_gate_drop_percent", "QPS drop of the candidate, percent", labels, registry=registry)
    failed = Gauge("recbalance_qps_gate_failed", "1 when the drop exceeds the allowed one", labels, registry=registry)
    for r in rows:
        key = (r["method"], r["level"])
        baseline.labels(*key).set(r["baseline_qps"])
        candidate.labels(*key).set(r["candidate_qps"])
        drop.labels(*key).set(r["drop_pct"])
        failed.labels(*key).set(1.0 if r["failed"] else 0.0)
    push_to_gateway(gateway, job=job, registry=registry, timeout=10)

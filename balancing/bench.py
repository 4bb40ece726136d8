"""`python -m balancing.bench`: what the balance point costs inside a ranking model's step,
on any machine with torch alone (no TorchRec, so it runs where TorchRec's CUDA build is not
installed).

The model is a plain-torch stand-in of recbalance's: sparse features through one embedding
table (sparse SGD), dense features through an MLP, DCNv2 low-rank cross layers on the
concatenation, then a shared bottom (node on its output) or MMoE (node on the expert outputs
and the gate input, as `models/heads.py` does), one tower per task, Adam. Variants share the
model and take turns, round by round: "none" (no node, the plain sum of the losses),
"METHOD" (the node with that balancer) and "METHOD@parameters" (the parameter level).
Per round each variant's time is divided by "none"'s, so the machine's drift cancels; the
paired ratio's median and quartiles over rounds are reported, with QPS and the time inside
the node (CUDA events on GPU). Output: bench.json and bench.md in --out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .parameter_level import ParameterLevelBalancing
from .point import BalancePoint
from .registry import available_methods, make_balancer

DTYPES = {"fp32": None, "bf16": torch.bfloat16}
NONE = "none"


@dataclass
class Sizes:
    """The stand-in model's sizes (defaults: the sizes issue 12 measured)."""

    sparse_features: int = 26
    rows: int = 1_000_000  # per sparse feature
    dim: int = 64
    dense_features: int = 13
    dense_layers: list[int] = field(default_factory=lambda: [512, 256, 64])
    cross_layers: int = 3
    cross_rank: int = 256
    bottom_layers: list[int] = field(default_factory=lambda: [1024, 512, 256])
    experts: int = 8
    expert_layers: list[int] = field(default_factory=lambda: [512, 256])
    tower_layers: list[int] = field(default_factory=lambda: [64])
    tasks: int = 3


def mlp(width: int, layers: Sequence[int]) -> nn.Sequential:
    parts: list[nn.Module] = []
    for out in layers:
        parts += [nn.Linear(width, out), nn.ReLU()]
        width = out
    return nn.Sequential(*parts)


class LowRankCross(nn.Module):
    """DCNv2 low-rank cross layers: x_{l+1} = x0 ⊙ (U_l (V_l x_l) + b_l) + x_l."""

    def __init__(self, width: int, layers: int, rank: int) -> None:
        super().__init__()
        self.v = nn.ModuleList(nn.Linear(width, rank, bias=False) for _ in range(layers))
        self.u = nn.ModuleList(nn.Linear(rank, width) for _ in range(layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for v, u in zip(self.v, self.u):
            x = x0 * u(v(x)) + x
        return x


class StandIn(nn.Module):
    """Embeddings + dense MLP + DCNv2, then a shared bottom or MMoE; ``point`` (a BalancePoint
    or None) sits where the task-specific modules start and can be swapped between steps."""

    def __init__(self, sizes: Sizes, kind: str) -> None:
        super().__init__()
        s = sizes
        self.sizes, self.kind = s, kind
        self.embedding = nn.Embedding(s.sparse_features * s.rows, s.dim, sparse=True)
        self.dense = mlp(s.dense_features, s.dense_layers)
        width = s.sparse_features * s.dim + s.dense_layers[-1]
        self.cross = LowRankCross(width, s.cross_layers, s.cross_rank)
        if kind == "mmoe":
            self.experts = nn.ModuleList(mlp(width, s.expert_layers) for _ in range(s.experts))
            self.gates = nn.ModuleList(nn.Linear(width, s.experts) for _ in range(s.tasks))
            top = s.expert_layers[-1]
        else:
            self.bottom = mlp(width, s.bottom_layers)
            top = s.bottom_layers[-1]
        self.towers = nn.ModuleList(nn.Sequential(mlp(top, s.tower_layers), nn.Linear(s.tower_layers[-1], 1))
                                    for _ in range(s.tasks))
        self.point: Optional[BalancePoint] = None

    def shared_dense_parameters(self) -> Iterator[nn.Parameter]:
        """Dense parameters upstream of the node (the parameter level's)."""
        yield from self.dense.parameters()
        yield from self.cross.parameters()
        yield from (self.experts if self.kind == "mmoe" else self.bottom).parameters()

    def forward(self, ids: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """Logits [M, B]."""
        sparse = self.embedding(ids).flatten(1)
        h = self.cross(torch.cat([self.dense(dense), sparse], dim=1))
        m = self.sizes.tasks
        if self.kind == "mmoe":
            shared = (torch.stack([e(h) for e in self.experts], dim=1), h)
            copies = self.point(shared) if self.point is not None else (shared,) * m
            logits = []
            for task, (experts, gate_input) in enumerate(copies):
                gate = torch.softmax(self.gates[task](gate_input), dim=-1)
                logits.append(self.towers[task](torch.bmm(gate.unsqueeze(1), experts).squeeze(1)))
        else:
            top = self.bottom(h)
            copies = self.point(top) if self.point is not None else (top,) * m
            logits = [self.towers[task](c) for task, c in enumerate(copies)]
        return torch.stack(logits).squeeze(-1)


@dataclass
class Variant:
    name: str
    method: Optional[str]  # None: no node
    level: str  # "representation" or "parameters"

    @staticmethod
    def parse(text: str) -> "Variant":
        method, _, level = text.partition("@")
        level = level or "representation"
        if method != NONE and method not in available_methods():
            raise SystemExit(f"bench: variant {text!r}: unknown method; allowed: {NONE}, {', '.join(available_methods())}")
        if level not in ("representation", "parameters") or (method == NONE and level != "representation"):
            raise SystemExit(f"bench: variant {text!r}: level must be 'representation' or 'parameters'")
        return Variant(text, None if method == NONE else method, level)


class Runner:
    """One shared model and optimizers; `step(variant)` trains one step as that variant."""

    def __init__(self, sizes: Sizes, kind: str, batch: int, device: torch.device, dtype: str,
                 variants: list[Variant], seed: int = 0, path: str = "auto") -> None:
        torch.manual_seed(seed)
        self.device, self.batch, self.sizes = device, batch, sizes
        self.autocast = DTYPES[dtype]
        self.model = StandIn(sizes, kind).to(device)
        dense = [p for n, p in self.model.named_parameters() if not n.startswith("embedding")]
        fused = device.type == "cuda"
        self.dense_opt = torch.optim.Adam(dense, lr=1e-4, fused=fused)
        self.sparse_opt = torch.optim.SGD(self.model.embedding.parameters(), lr=0.01)
        self.points: dict[str, Optional[BalancePoint]] = {}
        self.param_level: dict[str, ParameterLevelBalancing] = {}
        for v in variants:
            if v.method is None:
                self.points[v.name] = None
            elif v.level == "parameters":
                self.points[v.name] = None
                self.param_level[v.name] = ParameterLevelBalancing(
                    self.model.shared_dense_parameters(), make_balancer(v.method, sizes.tasks))
            else:
                balancer = make_balancer(v.method, sizes.tasks)
                balancer.path = path
                self.points[v.name] = BalancePoint(balancer).to(device)
        gen = torch.Generator(device="cpu").manual_seed(seed + 1)
        offsets = torch.arange(sizes.sparse_features) * sizes.rows
        self.ids = (torch.randint(0, sizes.rows, (batch, sizes.sparse_features), generator=gen) + offsets).to(device)
        self.dense = torch.randn(batch, sizes.dense_features, generator=gen).to(device)
        self.labels = (torch.rand(sizes.tasks, batch, generator=gen) < 0.3).float().to(device)

    def step(self, variant: Variant) -> None:
        model = self.model
        model.point = self.points[variant.name]
        balancer = model.point.balancer if model.point is not None else None
        level = self.param_level.get(variant.name)
        cast = torch.autocast(self.device.type, dtype=self.autocast) if self.autocast else nullcontext()
        with cast:
            logits = model(self.ids, self.dense)
        losses = F.binary_cross_entropy_with_logits(logits.float(), self.labels, reduction="none").mean(dim=1)
        objective = balancer.loss(losses) if balancer is not None else losses.sum()
        self.dense_opt.zero_grad(set_to_none=True)
        self.sparse_opt.zero_grad(set_to_none=True)
        objective.backward(retain_graph=level is not None)
        if level is not None:
            level.apply(level.per_task_gradients(losses, objective))
        self.dense_opt.step()
        self.sparse_opt.step()

    def node_seconds(self, variant: Variant) -> Optional[float]:
        point = self.points[variant.name]
        return point.last_balance_seconds if point is not None else None


class Clock:
    """Times a block of GPU work with CUDA events (elapsed GPU time), else the wall clock."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def time(self, work: Callable[[], None]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            work()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        started = time.perf_counter()
        work()
        return time.perf_counter() - started


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(q1, median, q3) of ``values`` (the median itself for fewer than 2 values)."""
    if len(values) < 2:
        v = float(values[0])
        return v, v, v
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda, but torch sees no GPU")
    variants = [Variant.parse(v) for v in args.variants.split(",")]
    if variants[0].method is not None:
        raise SystemExit(f"bench: the first variant must be '{NONE}' (the baseline of the paired ratios)")
    sizes = Sizes(sparse_features=args.sparse_features, rows=args.rows, dim=args.dim,
                  dense_features=args.dense_features, cross_layers=args.cross_layers, cross_rank=args.cross_rank,
                  experts=args.experts, tasks=args.tasks)
    runner = Runner(sizes, args.model, args.batch, device, args.dtype, variants, seed=args.seed, path=args.path)
    clock = Clock(device)
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    node: dict[str, list[float]] = {v.name: [] for v in variants}
    for r in range(args.warmup_rounds + args.rounds):
        shift = r % len(variants)
        for v in variants[shift:] + variants[:shift]:  # rotate: no variant always runs first
            seconds = clock.time(lambda: [runner.step(v) for _ in range(args.steps_per_round)])
            if r >= args.warmup_rounds:
                times[v.name].append(seconds / args.steps_per_round)
                inside = runner.node_seconds(v)
                if inside is not None:
                    node[v.name].append(inside)
    base = times[NONE]
    results = {}
    for v in variants:
        step = statistics.median(times[v.name])
        ratios = [b / t for b, t in zip(base, times[v.name])]  # QPS ratio: variant / none
        q1, med, q3 = quartiles(ratios)
        inside = statistics.median(node[v.name]) if node[v.name] else None
        results[v.name] = {
            "step_ms": step * 1e3, "qps": args.batch / step,
            "paired_qps_ratio": {"median": med, "q1": q1, "q3": q3},
            "node_ms": None if inside is None else inside * 1e3,
            "node_share": None if inside is None else inside / step,
            "round_step_ms": [t * 1e3 for t in times[v.name]],
        }
    return {
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "dtype": args.dtype, "model": args.model, "batch": args.batch, "path": args.path,
        "rounds": args.rounds, "steps_per_round": args.steps_per_round, "sizes": asdict(sizes), "variants": results,
    }


def markdown(report: dict) -> str:
    lines = [
        f"{report['model']}, batch {report['batch']:,}, {report['dtype']}, {report['device_name']} (torch {report['torch']}), "
        f"{report['path']} path, {report['rounds']} rounds x {report['steps_per_round']} steps",
        "",
        "| variant | step ms | QPS | paired QPS ratio to none [q1, q3] | node ms | node share |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in report["variants"].items():
        p = r["paired_qps_ratio"]
        node = "" if r["node_ms"] is None else f"{r['node_ms']:.3f}"
        share = "" if r["node_share"] is None else f"{100 * r['node_share']:.2f}%"
        lines.append(f"| {name} | {r['step_ms']:.2f} | {r['qps']:,.0f} | {p['median']:.3f} [{p['q1']:.3f}, {p['q3']:.3f}] "
                     f"| {node} | {share} |")
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m balancing.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="bf16: the forward under autocast")
    p.add_argument("--model", choices=("shared_bottom", "mmoe"), default="shared_bottom")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--variants", default="none,equal,multibalance,cograd,mgda,pcgrad,multibalance@parameters",
                   help="comma-separated; the first must be 'none'")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--steps-per-round", type=int, default=5)
    p.add_argument("--warmup-rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--path", choices=("auto", "host", "device"), default="auto",
                   help="the balancers' path (auto: device path off the CPU); 'device' on a CPU runs the GPU code")
    defaults = Sizes()
    for name in ("sparse_features", "rows", "dim", "dense_features", "cross_layers", "cross_rank", "experts", "tasks"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    p.add_argument("--out", default="bench-out", help="directory for bench.json and bench.md")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    for name in ("batch", "rounds", "steps_per_round", "sparse_features", "rows", "dim", "tasks"):
        if getattr(args, name) < 1:
            raise SystemExit(f"bench: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    report = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=1) + "\n")
    table = markdown(report)
    (out / "bench.md").write_text(table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

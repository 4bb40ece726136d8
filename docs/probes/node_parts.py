"""Development probe, not part of the product: what each part of the balance point costs
INSIDE a training step (DCNv2 + shared bottom on census, global batch 2048, one process,
one thread), where caches are cold and every operation costs more than in a loop.

It trains the `bench qps` model for 150 steps per variant (the first 50 discarded) and
prints medians in µs:
  shipped     the node with `equal` and `multibalance` as they are in balancing/
  sum-only    a node whose combine is the one add autograd would do without a node
  two-task    MultiBalance written out for M = 2 with no checks, timed part by part
The README's "What balancing costs" quotes it. Run from the repository root after
`make install` and `recbalance data census --output data/census`:

    OMP_NUM_THREADS=1 .venv/bin/python docs/probes/node_parts.py
"""
from __future__ import annotations

import math
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from balancing.methods.equal import Equal  # noqa: E402
from balancing.methods.multibalance import MultiBalance  # noqa: E402
from trainer.run.allocator import keep_freed_memory  # noqa: E402
from trainer.bench.qps import Variant, variant_config  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.run.distributed import init_distributed, shutdown_distributed  # noqa: E402
from trainer.core.trainer import Trainer  # noqa: E402
from trainer.run.worker import quiet_libraries  # noqa: E402

STEPS, WARMUP = 150, 50
parts: Dict[str, List[float]] = defaultdict(list)


def sum_only(self: Equal, grads):  # type: ignore[no-untyped-def]
    return torch.add(grads[0], grads[1])


def two_task(self: MultiBalance, grads):  # type: ignore[no-untyped-def]
    """Algorithm 3 (cosine direction, EMA on) for M = 2, straight-line, with timers."""
    clock = [time.perf_counter()]
    a, b = grads[0].view(-1), grads[1].view(-1)
    clock.append(time.perf_counter())
    dots = [torch.dot(a, a), torch.dot(a, b), torch.dot(b, b)]
    clock.append(time.perf_counter())
    g00, g01, g11 = torch.stack(dots).tolist()
    clock.append(time.perf_counter())
    st = self._state
    n0, n1 = math.sqrt(g00), math.sqrt(g11)
    if st.ema_norms is None:
        u0, u1 = n0, n1
    else:
        u0 = (1 - self.gamma) * st.ema_norms[0] + self.gamma * n0
        u1 = (1 - self.gamma) * st.ema_norms[1] + self.gamma * n1
    st.ema_norms = [u0, u1]
    s0, s1 = (u0 / n0 if n0 > 0 else 0.0), (u1 / n1 if n1 > 0 else 0.0)
    v00, v01, v11 = s0 * s0 * g00, s0 * s1 * g01, s1 * s1 * g11
    lam0, lam1 = st.lambdas
    m0, m1 = lam0 + self.rho / 2, lam1 + self.rho / 2
    d0, d1 = v00 * m0 + v01 * m1, v01 * m0 + v11 * m1
    mix_norm = math.sqrt(max(m0 * d0 + m1 * d1, 0.0))
    d0 = d0 / (math.sqrt(v00) * mix_norm) if v00 * mix_norm > 0 else 0.0
    d1 = d1 / (math.sqrt(v11) * mix_norm) if v11 * mix_norm > 0 else 0.0
    x0, x1 = lam0 - self.beta * d0, lam1 - self.beta * d1
    lam0 = min(max((x0 - x1 + 1) / 2, 0.0), 1.0)
    st.lambdas = [lam0, 1.0 - lam0]
    c0, c1 = 2 * lam0 * s0, 2 * (1.0 - lam0) * s1
    clock.append(time.perf_counter())
    out = torch.add(grads[0], grads[1], alpha=c1 / c0)
    clock.append(time.perf_counter())
    out.mul_(c0)
    clock.append(time.perf_counter())
    for name, start, end in zip(("views", "three dots", "stack + tolist", "2x2 arithmetic", "add", "mul_"),
                                clock, clock[1:]):
        parts[name].append(end - start)
    return out


def run(method: str, combine: Optional[Callable] = None) -> Tuple[float, float]:
    """Median node time (µs) and step time (ms) over the measured steps, with ``combine``
    patched in."""
    cls = {"equal": Equal, "multibalance": MultiBalance}[method]
    shipped = cls._combine
    if combine is not None:
        cls._combine = combine
    parts.clear()
    cfg = load_config("configs/census.toml", ["model.kind=shared_bottom", "data.global_batch_size=2048"])
    env = init_distributed()
    try:
        with tempfile.TemporaryDirectory() as out:
            trainer = Trainer(variant_config(cfg.to_dict(), Variant(method, "representation")), env, Path(out))
            node, steps = [], []
            for step in range(STEPS):
                batch = next(trainer.stream)
                started = time.perf_counter()
                result = trainer.train_step(batch)
                if step >= WARMUP:
                    steps.append(time.perf_counter() - started)
                    node.append(result.balance_seconds)
    finally:
        shutdown_distributed()
        cls._combine = shipped
    return 1e6 * statistics.median(node), 1e3 * statistics.median(steps)


def main() -> None:
    quiet_libraries()
    keep_freed_memory()
    torch.set_num_threads(1)
    rows = [("shipped equal: node", *run("equal")), ("shipped multibalance: node", *run("multibalance")),
            ("sum-only: node", *run("equal", sum_only))]
    two = run("multibalance", two_task)
    rows += [(f"two-task: {name}", 1e6 * statistics.median(t[WARMUP:]), two[1]) for name, t in parts.items()]
    rows.append(("two-task: node", *two))
    print(f"{'':34s} {'µs':>8s} {'% of step':>10s}")
    for name, us, step_ms in rows:
        print(f"{name:34s} {us:8.1f} {100 * us / (1e3 * step_ms):9.2f}%")


if __name__ == "__main__":
    main()

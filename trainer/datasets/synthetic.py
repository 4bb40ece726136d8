"""Synthetic multi-task CTR data with a controllable relation between tasks.

In the spirit of the MMoE paper's synthetic benchmark (Ma et al. 2018, §4): task weight
vectors w_1 = c·u_1 and w_m = c·(r·u_1 + sqrt(1 - r²)·u_m) for orthonormal u_m, so
cos(w_1, w_m) = r (``relation``: 1 cooperating, 0 unrelated, -1 conflicting). Each
task's logit is f_m(x) = w_m·x + Σ_i sin(α_i·w_m·x + β_i) + b_m and its label is
Bernoulli(sigmoid(f_m)). Unlike the paper, x is built from what a ranking model sees:
per-id random latent vectors of a user id, an item id and its category (plus a
user⊙item interaction), some dense features and optionally a multi-hot history. The
biases b_m are calibrated to the requested base rates. With ``cascade`` the second
task is a conversion: possible only when the first (click) is 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from trainer.data.schema import Schema, SparseFeature
from trainer.datasets.writer import DEFAULT_ROW_GROUP_SIZE, SplitWriter, arrow_schema, write_schema

_SPLIT_IDS = {"train": 0, "valid": 1, "test": 2}
_NUM_SIN = 3


@dataclass
class SyntheticInfo:
    """What ``make_synthetic`` wrote and the ground truth it used."""

    out_dir: Path
    schema: Schema
    rows: dict[str, int]
    label_rates: dict[str, list[float]]   # per split, per task
    task_cosines: np.ndarray              # [M, M] cosines of the true task weight vectors
    label_correlation: float              # train: Pearson correlation of labels 0 and 1 (nan if M == 1)
    logit_correlation: float              # train: correlation of the true logits of tasks 0 and 1
    biases: list[float] = field(default_factory=list)


@dataclass
class _World:
    """The random ground truth shared by all splits."""

    user_lat: np.ndarray
    item_lat: np.ndarray
    cat_lat: np.ndarray
    item_cat: np.ndarray
    user_p: np.ndarray
    item_p: np.ndarray
    w: np.ndarray          # [M, P]
    alpha: np.ndarray
    beta: np.ndarray
    bias: np.ndarray       # [M]


def task_names(num_tasks: int) -> list[str]:
    """Label column names: click, conversion, task_2, task_3, ..."""
    base = ["click", "conversion"]
    return [base[m] if m < len(base) else f"task_{m}" for m in range(num_tasks)]


def task_vectors(num_tasks: int, dim: int, relation: float, scale: float, rng: np.random.Generator) -> np.ndarray:
    """[M, dim] weights with cos(w_0, w_m) = relation for every m >= 1 (MMoE construction)."""
    if dim < num_tasks:
        raise ValueError(f"need at least {num_tasks} input dimensions for {num_tasks} tasks, got {dim}")
    basis, _ = np.linalg.qr(rng.standard_normal((dim, num_tasks)))
    u = basis.T
    w = np.empty((num_tasks, dim))
    w[0] = u[0]
    for m in range(1, num_tasks):
        w[m] = relation * u[0] + np.sqrt(max(0.0, 1.0 - relation * relation)) * u[m]
    return scale * w


def _zipf(n: int, exponent: float) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1) ** exponent
    return p / p.sum()


def _features(world: _World, n: int, num_dense: int, history_length: int,
              rng: np.random.Generator) -> tuple[dict[str, object], np.ndarray]:
    """Raw columns and the model input x [n, P] for n impressions."""
    users = rng.choice(len(world.user_p), size=n, p=world.user_p)
    items = rng.choice(len(world.item_p), size=n, p=world.item_p)
    cats = world.item_cat[items]
    dense = rng.standard_normal((n, num_dense)).astype(np.float32)
    ul, il = world.user_lat[users], world.item_lat[items]
    parts = [ul, il, world.cat_lat[cats], ul * il, dense]
    cols: dict[str, object] = {"user_id": users.astype(np.int64), "item_id": items.astype(np.int64),
                               "category": cats.astype(np.int64)}
    if history_length > 0:
        lengths = rng.integers(0, history_length + 1, size=n)
        hist = rng.choice(len(world.item_p), size=int(lengths.sum()), p=world.item_p).astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        cols["history"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(hist))
        sums = np.zeros((n, world.item_lat.shape[1]))
        np.add.at(sums, np.repeat(np.arange(n), lengths), world.item_lat[hist])
        parts.append(sums / np.sqrt(np.maximum(lengths, 1))[:, None])
    for k in range(num_dense):
        cols[f"dense_{k}"] = dense[:, k]
    return cols, np.concatenate(parts, axis=1)


def _logits_wo_bias(world: _World, x: np.ndarray) -> np.ndarray:
    """[n, M] f_m(x) without the bias."""
    z = x @ world.w.T
    out = z.copy()
    for a, b in zip(world.alpha, world.beta):
        out += np.sin(a * z + b)
    return out


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _calibrate(logits: np.ndarray, rate: float) -> float:
    """Bias b with mean(sigmoid(logits + b)) == rate (bisection)."""
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if _sigmoid(logits + mid).mean() < rate:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def make_synthetic(out_dir: str | Path, rows: int, num_tasks: int = 2, relation: float = 0.5,
                   cascade: bool = False, seed: int = 0, *, num_users: int = 1000, num_items: int = 5000,
                   num_categories: int = 50, num_dense: int = 4, latent_dim: int = 8, signal: float = 1.5,
                   history_length: int = 0, base_rates: list[float] | None = None, valid_fraction: float = 0.1,
                   test_fraction: float = 0.1, embedding_dim: int = 8,
                   row_group_size: int = DEFAULT_ROW_GROUP_SIZE, chunk_rows: int = 1 << 18) -> SyntheticInfo:
    """Write a synthetic multi-task CTR dataset to ``out_dir``; see the module docstring.

    ``rows`` is the total over train/valid/test. ``base_rates`` are the positive rates
    per task (default click 0.2, others 0.15; with ``cascade`` the conversion rate is
    0.3 *among clicks*). Deterministic given ``seed``; memory bounded by ``chunk_rows``.
    """
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    if not -1.0 <= relation <= 1.0:
        raise ValueError(f"relation must be in [-1, 1], got {relation}")
    if cascade and num_tasks < 2:
        raise ValueError("cascade needs num_tasks >= 2 (task 2 is conditioned on task 1)")
    if rows <= 0:
        raise ValueError(f"rows must be positive, got {rows}")
    if not (0 <= valid_fraction < 1 and 0 <= test_fraction < 1 and valid_fraction + test_fraction < 1):
        raise ValueError(f"valid_fraction + test_fraction must be in [0, 1), got {valid_fraction}, {test_fraction}")
    if base_rates is None:
        base_rates = [0.2] + [0.3 if cascade and m == 1 else 0.15 for m in range(1, num_tasks)]
    if len(base_rates) != num_tasks or not all(0 < r < 1 for r in base_rates):
        raise ValueError(f"base_rates must be {num_tasks} numbers in (0, 1), got {base_rates}")

    rng = np.random.default_rng([seed, 12345])
    world = _World(
        user_lat=rng.standard_normal((num_users, latent_dim)),
        item_lat=rng.standard_normal((num_items, latent_dim)),
        cat_lat=rng.standard_normal((num_categories, latent_dim)),
        item_cat=rng.integers(0, num_categories, size=num_items),
        user_p=rng.permutation(_zipf(num_users, 0.7)), item_p=rng.permutation(_zipf(num_items, 0.9)),
        w=np.zeros((num_tasks, 1)), alpha=rng.uniform(0.5, 1.5, _NUM_SIN), beta=rng.normal(0, 1, _NUM_SIN),
        bias=np.zeros(num_tasks))
    _, x_cal = _features(world, 4096, num_dense, history_length, np.random.default_rng([seed, 99]))
    dim = x_cal.shape[1]
    world.w = task_vectors(num_tasks, dim, relation, signal / np.sqrt(x_cal.var(axis=0).mean()), rng)
    cal_logits = _logits_wo_bias(world, x_cal)
    world.bias = np.array([_calibrate(cal_logits[:, m], base_rates[m]) for m in range(num_tasks)])

    labels = task_names(num_tasks)
    sparse = [SparseFeature("user_id", num_users, embedding_dim), SparseFeature("item_id", num_items, embedding_dim),
              SparseFeature("category", num_categories, embedding_dim)]
    if history_length > 0:
        sparse.append(SparseFeature("history", num_items, embedding_dim, multi_hot=True))
    schema = Schema(labels=labels, dense=[f"dense_{k}" for k in range(num_dense)], sparse=sparse,
                    user_id="user_id", personal_features=["user_id"])
    out = Path(out_dir)
    write_schema(schema, out)
    types = arrow_schema(schema)

    n_valid, n_test = int(round(rows * valid_fraction)), int(round(rows * test_fraction))
    sizes = {"train": rows - n_valid - n_test, "valid": n_valid, "test": n_test}
    rates: dict[str, list[float]] = {}
    corr_acc = np.zeros(4)  # sums for the train label correlation: n, Σa, Σb, Σab
    logit_pairs: list[np.ndarray] = []
    for split, total in sizes.items():
        positives = np.zeros(num_tasks)
        with SplitWriter(out, split, types, row_group_size=row_group_size) as writer:
            for c, start in enumerate(range(0, total, chunk_rows)):
                n = min(chunk_rows, total - start)
                crng = np.random.default_rng([seed, _SPLIT_IDS[split], c])
                cols, x = _features(world, n, num_dense, history_length, crng)
                logits = _logits_wo_bias(world, x) + world.bias
                y = (crng.random((n, num_tasks)) < _sigmoid(logits)).astype(np.float32)
                if cascade:
                    y[:, 1] *= y[:, 0]
                for m, name in enumerate(labels):
                    cols[name] = y[:, m]
                positives += y.sum(axis=0)
                writer.write(pa.table(cols))
                if split == "train" and num_tasks >= 2:
                    a, b = y[:, 0].astype(np.float64), y[:, 1].astype(np.float64)
                    corr_acc += [n, a.sum(), b.sum(), (a * b).sum()]
                    if sum(len(p) for p in logit_pairs) < 200_000:
                        logit_pairs.append(logits[:, :2])
        rates[split] = (positives / max(total, 1)).tolist()

    label_corr = logit_corr = float("nan")
    if num_tasks >= 2 and corr_acc[0] > 0:
        n, sa, sb, sab = corr_acc
        pa_, pb = sa / n, sb / n
        denom = np.sqrt(pa_ * (1 - pa_) * pb * (1 - pb))
        label_corr = float((sab / n - pa_ * pb) / denom) if denom > 0 else float("nan")
        lp = np.concatenate(logit_pairs)
        logit_corr = float(np.corrcoef(lp[:, 0], lp[:, 1])[0, 1])
    norms = np.linalg.norm(world.w, axis=1)
    cosines = (world.w @ world.w.T) / np.outer(norms, norms)
    return SyntheticInfo(out_dir=out, schema=schema, rows=sizes, label_rates=rates, task_cosines=cosines,
                         label_correlation=label_corr, logit_correlation=logit_corr, biases=world.bias.tolist())

"""Linear algebra on small dense matrices held as Python floats.

The host path's solvers work on the M x M Gram matrix (M = number of tasks, a handful)
inside the backward pass, where one tensor operation costs 5-15 µs on a CPU and all the
arithmetic of an M x M problem costs less than that: this is why the host path uses
floats (the device path, `device_linalg`, exists because on a GPU reading them back would
stall). Vectors are lists of floats, matrices lists of rows.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

Vector = List[float]
Matrix = List[List[float]]


def dot(x: Sequence[float], y: Sequence[float]) -> float:
    return sum(a * b for a, b in zip(x, y))


def matvec(k: Sequence[Sequence[float]], x: Sequence[float]) -> Vector:
    return [dot(row, x) for row in k]


def quad(k: Sequence[Sequence[float]], x: Sequence[float]) -> float:
    """xᵀ K x."""
    return dot(x, matvec(k, x))


def solve(a: Sequence[Sequence[float]], b: Sequence[float]) -> Optional[Vector]:
    """x with A x = b by Gaussian elimination with partial pivoting; None when A is
    singular (a zero pivot) or the solution is not finite."""
    n = len(b)
    rows = [list(map(float, a[i])) + [float(b[i])] for i in range(n)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(rows[r][col]))
        if rows[pivot][col] == 0.0:
            return None
        rows[col], rows[pivot] = rows[pivot], rows[col]
        head = rows[col]
        for r in range(col + 1, n):
            factor = rows[r][col] / head[col]
            if factor:
                rows[r] = [x - factor * h for x, h in zip(rows[r], head)]
    x = [0.0] * n
    for i in range(n - 1, -1, -1):
        x[i] = (rows[i][n] - sum(rows[i][j] * x[j] for j in range(i + 1, n))) / rows[i][i]
    return x if all(math.isfinite(v) for v in x) else None


def largest_eigenvalue(k: Sequence[Sequence[float]], sweeps: int = 50) -> float:
    """Largest eigenvalue of the symmetric matrix K by cyclic Jacobi rotations (exact to
    rounding for the few-by-few matrices here; a fixed-point step size 1/lambda_max needs it)."""
    n = len(k)
    a = [list(map(float, row)) for row in k]
    for _ in range(sweeps):
        off = sum(a[p][q] * a[p][q] for p in range(n) for q in range(p + 1, n))
        scale = sum(a[i][i] * a[i][i] for i in range(n))
        if off <= 1e-30 * scale or off == 0.0:
            break
        for p in range(n - 1):
            for q in range(p + 1, n):
                if a[p][q] == 0.0:
                    continue
                theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q])
                t = math.copysign(1.0, theta) / (abs(theta) + math.sqrt(theta * theta + 1.0))
                c = 1.0 / math.sqrt(t * t + 1.0)
                s = t * c
                for r in range(n):  # A <- A J (columns p, q)
                    arp, arq = a[r][p], a[r][q]
                    a[r][p], a[r][q] = c * arp - s * arq, s * arp + c * arq
                for r in range(n):  # A <- Jᵀ A (rows p, q)
                    apr, aqr = a[p][r], a[q][r]
                    a[p][r], a[q][r] = c * apr - s * aqr, s * apr + c * aqr
    return max(a[i][i] for i in range(n))

"""Solvers of `balancing`: simplex projection, min-norm point, Nash-bargaining weights, and
the small float linear algebra under them."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from balancing import min_norm_weights, nash_bargaining_weights, project_simplex
from balancing.small_linalg import largest_eigenvalue, matvec, quad, solve


def np_project_simplex(v: np.ndarray) -> np.ndarray:
    """Independent: bisection on the threshold theta with sum(max(v - theta, 0)) = 1."""
    lo, hi = v.min() - 1.0, v.max()
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.maximum(v - mid, 0).sum() > 1.0:
            lo = mid
        else:
            hi = mid
    return np.maximum(v - 0.5 * (lo + hi), 0)


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
def test_project_simplex_matches_bisection(m):
    rng = np.random.default_rng(m)
    for scale in (0.1, 1.0, 10.0):
        v = rng.normal(size=m) * scale
        got = project_simplex(torch.tensor(v)).numpy()
        np.testing.assert_allclose(got, np_project_simplex(v), atol=1e-12)
        assert got.min() >= 0 and abs(got.sum() - 1) < 1e-12


def _grid(m: int, steps: int) -> np.ndarray:
    pts = [c for c in itertools.product(range(steps + 1), repeat=m - 1) if sum(c) <= steps]
    a = np.array(pts, dtype=np.float64) / steps
    return np.concatenate([a, 1 - a.sum(1, keepdims=True)], axis=1)


@pytest.mark.parametrize("m,steps", [(2, 20000), (3, 400)])
def test_min_norm_against_brute_force_grid(m, steps):
    rng = np.random.default_rng(10 + m)
    grid = _grid(m, steps)
    for trial in range(6):
        g = rng.normal(size=(m, 7))
        if trial % 2:  # conflicting gradients -> interior solutions
            g[1] = -0.7 * g[0] + 0.3 * rng.normal(size=7)
        k = g @ g.T
        values = np.einsum("pi,ij,pj->p", grid, k, grid)
        best = values.min()
        a = min_norm_weights(torch.tensor(k)).numpy()
        assert a.min() >= 0 and abs(a.sum() - 1) < 1e-12
        got = a @ k @ a
        assert got <= best + 1e-12
        # a grid point lies within sqrt(m)/steps of the optimum: f differs by <= L * m / steps²
        assert got >= best - np.linalg.eigvalsh(k)[-1] * m / steps**2


@pytest.mark.parametrize("m", [4, 5, 6])
def test_min_norm_kkt_conditions(m):
    rng = np.random.default_rng(m)
    for _ in range(5):
        g = rng.normal(size=(m, 3 * m)) * rng.uniform(0.2, 3.0, size=(m, 1))
        k = g @ g.T
        a = min_norm_weights(torch.tensor(k)).numpy()
        grad = k @ a  # KKT: (K a)_i = aᵀKa on the support, >= aᵀKa elsewhere
        f = a @ k @ a
        assert np.all(grad >= f - 1e-9 * np.trace(k))
        assert np.allclose(grad[a > 1e-9], f, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("m", [2, 3, 4, 5])
def test_nash_bargaining_solves_k_alpha_eq_inverse_alpha(m):
    rng = np.random.default_rng(100 + m)
    for trial in range(5):
        g = rng.normal(size=(m, m + 3)) * rng.uniform(0.1, 10.0, size=(m, 1))
        k = g @ g.T
        alpha, ok = nash_bargaining_weights(torch.tensor(k))
        a = alpha.numpy()
        assert ok and a.dtype == np.float64 and np.all(a > 0)
        np.testing.assert_allclose(k @ a, 1.0 / a, rtol=1e-8)
        # warm start from a nearby point converges to the same solution
        alpha2, ok2 = nash_bargaining_weights(torch.tensor(k), init=alpha * 1.3, max_iter=50)
        assert ok2 and np.allclose(alpha2.numpy(), a, rtol=1e-8)


def test_nash_bargaining_reports_non_convergence():
    k = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)  # g, -g: no solution
    alpha, ok = nash_bargaining_weights(k, max_iter=20)
    assert not ok and alpha.shape == (2,)
    alpha, ok = nash_bargaining_weights(k, ridge=1e-6)  # the ridge makes it solvable
    assert ok


@pytest.mark.parametrize("n", [1, 2, 3, 6])
def test_small_linalg_matches_numpy(n):
    rng = np.random.default_rng(40 + n)
    for _ in range(5):
        a = rng.normal(size=(n, n))
        a[0] = a[-1] * 1e-3 + a[0]  # needs pivoting now and then
        b, x = rng.normal(size=n), rng.normal(size=n)
        np.testing.assert_allclose(solve(a.tolist(), b.tolist()), np.linalg.solve(a, b), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(matvec(a.tolist(), x.tolist()), a @ x, rtol=1e-12)
        np.testing.assert_allclose(quad(a.tolist(), x.tolist()), x @ a @ x, rtol=1e-12)


def test_small_linalg_solve_reports_singular_systems():
    assert solve([[1.0, 2.0], [2.0, 4.0]], [1.0, 2.0]) is None  # rank 1
    assert solve([[0.0]], [1.0]) is None
    assert solve([[1.0, 0.0], [0.0, 1.0]], [float("nan"), 1.0]) is None  # non-finite solution


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_largest_eigenvalue_matches_eigvalsh(n):
    rng = np.random.default_rng(60 + n)
    for rank in range(n + 1):  # PSD Gram matrices of every rank, zero included
        g = rng.normal(size=(n, rank)) * rng.uniform(0.01, 10.0, size=(n, 1))
        k = g @ g.T
        np.testing.assert_allclose(largest_eigenvalue(k.tolist()), np.linalg.eigvalsh(k)[-1], rtol=1e-12, atol=1e-12)
    sym = rng.normal(size=(n, n))
    sym = sym + sym.T  # indefinite too
    np.testing.assert_allclose(largest_eigenvalue(sym.tolist()), np.linalg.eigvalsh(sym)[-1], rtol=1e-12, atol=1e-12)

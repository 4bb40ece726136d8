"""M x M solvers as tensor operations on the Gram's own device, with no host read.

The device path of the balance point (`Balancer` on CUDA) must not read the Gram back to
the host inside the backward pass: a read stalls the CPU until the GPU queue drains. So
every solver here has a fixed shape and no branch on a value: candidates are computed
side by side and selected with `torch.where` / `argmin`. Exact problems over the simplex
(min-norm, CAGrad's dual) enumerate the faces of the simplex: 2^M - 1 small linear systems
solved in one batched `linalg.solve_ex` (which, unlike `linalg.solve`, does not check for
errors on the host). `MAX_FACE_TASKS` bounds M for them.
"""
from __future__ import annotations

from functools import lru_cache

import torch

#: largest M whose simplex faces (2^M - 1 of them) are enumerated on the device
MAX_FACE_TASKS = 10


def project_simplex_tensor(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of ``v`` [M] onto the probability simplex (the sort-based
    algorithm of `balancing.simplex.project_simplex_values`, vectorised)."""
    m = v.shape[0]
    u, _ = torch.sort(v, descending=True)
    partial = torch.cumsum(u, 0) - 1.0
    j = torch.arange(1, m + 1, device=v.device, dtype=v.dtype)
    active = (u - partial / j) > 0  # true on a prefix 1..rho
    rho = (active.to(v.dtype) * j).amax().clamp_min(1.0)
    theta = partial.gather(0, (rho - 1).long().view(1)) / rho
    return (v - theta).clamp_min(0.0)


@lru_cache(maxsize=32)
def _face_masks_cpu(m: int) -> torch.Tensor:
    """[2^M - 1, M] float64 0/1 rows: every non-empty subset of the M tasks."""
    if m > MAX_FACE_TASKS:
        raise ValueError(f"device solvers enumerate simplex faces for at most {MAX_FACE_TASKS} tasks, got {m}")
    codes = torch.arange(1, 2**m, dtype=torch.long)
    bits = (codes.unsqueeze(1) >> torch.arange(m, dtype=torch.long)) & 1
    return bits.to(torch.float64)


def face_masks(m: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`_face_masks_cpu` on ``device`` (a host-to-device copy, never a read back)."""
    return _face_masks_cpu(m).to(device=device, dtype=dtype)


def _restricted(k: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """[F, M, M]: K on each face's tasks, identity on the others (so a solve leaves them 0)."""
    outer = masks.unsqueeze(2) * masks.unsqueeze(1)
    return k.unsqueeze(0) * outer + torch.diag_embed(1.0 - masks)


def _feasible(w: torch.Tensor, masks: torch.Tensor, info: torch.Tensor) -> torch.Tensor:
    """Rows of ``w`` [F, M] that are finite, solved without a zero pivot and >= 0 (to
    rounding) on their face."""
    scale = w.abs().amax(dim=1).clamp_min(1.0)
    return (info == 0) & torch.isfinite(w).all(dim=1) & ((w * masks) >= -1e-10 * scale.unsqueeze(1)).all(dim=1)


def _on_simplex(w: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Clamp each face's solution to >= 0 and renormalise it to sum 1 (finite rows only)."""
    w = torch.nan_to_num(w * masks, nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0.0)
    total = w.sum(dim=1, keepdim=True)
    return torch.where(total > 0, w / torch.where(total > 0, total, torch.ones_like(total)), masks / masks.sum(1, True))


def _pick(rows: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The row of ``rows`` with the smallest ``value`` (indexing by a tensor would read it)."""
    return rows.index_select(0, torch.argmin(value).view(1))[0]


def _quad_rows(k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """wᵀ K w for every row of ``w`` [F, M]."""
    return ((w @ k) * w).sum(dim=1)


def min_norm_candidates(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The min-norm point of each simplex face: ``(w [F, M] on the simplex, feasible [F])``.

    On a face S the minimiser of wᵀKw with 1ᵀw = 1 solves [[K_SS, 1], [1ᵀ, 0]] [w; -mu] = [0; 1]."""
    m = k.shape[0]
    masks = face_masks(m, k.device, k.dtype)
    faces = masks.shape[0]
    system = torch.zeros(faces, m + 1, m + 1, device=k.device, dtype=k.dtype)
    system[:, :m, :m] = _restricted(k, masks)
    system[:, :m, m] = masks
    system[:, m, :m] = masks
    rhs = torch.zeros(faces, m + 1, 1, device=k.device, dtype=k.dtype)
    rhs[:, m, 0] = 1.0
    sol, info = torch.linalg.solve_ex(system, rhs)
    w = sol[:, :m, 0]
    return _on_simplex(w, masks), _feasible(w, masks, info)


def min_norm_tensor(k: torch.Tensor) -> torch.Tensor:
    """argmin over the simplex of wᵀ K w (MGDA), K [M, M] float64 on any device.

    Every face's KKT solution is a point of the simplex, so the best feasible one is the
    exact optimum whenever the optimum's face has a regular system (the vertices always do)."""
    w, ok = min_norm_candidates(k)
    value = torch.where(ok, _quad_rows(k, w), torch.full_like(ok, float("inf"), dtype=k.dtype))
    return _pick(w, value)


def cagrad_dual_tensor(k: torch.Tensor, c: float) -> torch.Tensor:
    """argmin over the simplex of F(w) = bᵀw + r sqrt(wᵀKw), b = K1/M, r = c ||g0|| (CAGrad's
    dual, the problem `balancing.methods.cagrad.solve_dual` solves iteratively).

    On a face S with y = K_SS⁻¹1, z = K_SS⁻¹b, a = 1ᵀy, β = 1ᵀz, γ = bᵀz the stationarity
    conditions b + r K w / ||g_w|| = ν1, 1ᵀw = 1 give, with D = β² − a(γ − r²),
    w = (ν y − z) / sqrt(D), ν = (β + sqrt(D)) / a. F is convex, so the best feasible face
    solution is the optimum; vertices and the min-norm points of each face (where F is
    not differentiable) are candidates too."""
    m = k.shape[0]
    masks = face_masks(m, k.device, k.dtype)
    b = k.sum(dim=1) / m
    r = c * (b.sum() / m).clamp_min(0.0).sqrt()  # ||g0||² = 1ᵀK1 / M²
    rhs = torch.stack([masks, b.unsqueeze(0) * masks], dim=2)  # [F, M, 2]: (1_S, b_S)
    sol, info = torch.linalg.solve_ex(_restricted(k, masks), rhs)
    y, z = sol[..., 0], sol[..., 1]
    a, beta, gamma = (y * masks).sum(1), (z * masks).sum(1), (b * z * masks).sum(1)
    disc = beta * beta - a * (gamma - r * r)
    root = disc.clamp_min(0.0).sqrt()
    nu = (beta + root) / a
    w = (nu.unsqueeze(1) * y - z) / root.unsqueeze(1)
    ok = _feasible(w, masks, info) & (disc > 0) & (a > 0)
    stationary = _on_simplex(w, masks)
    vertices = torch.eye(m, device=k.device, dtype=k.dtype)
    hull, hull_ok = min_norm_candidates(k)
    cands = torch.cat([stationary, vertices, hull])
    valid = torch.cat([ok, torch.ones(m, dtype=torch.bool, device=k.device), hull_ok])
    value = cands @ b + r * _quad_rows(k, cands).clamp_min(0.0).sqrt()
    value = torch.where(valid, value, torch.full_like(value, float("inf")))
    return _pick(cands, value)


def min_norm_solve(a: torch.Tensor, b: torch.Tensor, refinements: int = 6) -> torch.Tensor:
    """pinv(A) b for a small square A: the solution of A x = b when A is regular, the
    minimum-norm least-squares one when it is (numerically) singular, by iterated Tikhonov
    regularisation x <- x + (AᵀA + δI)⁻¹ Aᵀ(b − A x), δ = 1e-8 tr(AᵀA); each refinement
    shrinks the regularisation bias by δ / (σ² + δ). `linalg.pinv` would synchronise, and a
    plain solve returns ~1e15 for a system singular up to rounding."""
    n = a.shape[0]
    normal = a.transpose(0, 1) @ a
    ridge = 1e-8 * normal.diagonal().sum().clamp_min(1e-300)
    lu, pivots, _ = torch.linalg.lu_factor_ex(normal + ridge * torch.eye(n, device=a.device, dtype=a.dtype))
    x = torch.zeros(n, 1, device=a.device, dtype=a.dtype)
    for _ in range(refinements):
        x = x + torch.linalg.lu_solve(lu, pivots, a.transpose(0, 1) @ (b.unsqueeze(1) - a @ x))
    return x.squeeze(1)

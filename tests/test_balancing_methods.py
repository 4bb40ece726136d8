"""Every balancing method against an independent NumPy (float64) transcription of its paper's
equations, written step by step on explicit flattened gradient vectors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from balancing import make_balancer
from balancing.methods.imtl_g import imtl_g_values
from balancing.methods.pcgrad import task_orders
from balancing.rng import step_generator

M, B, K = 3, 6, 5
SCALES = np.array([1.0, 4.0, 0.25, 2.0, 0.5])


def random_steps(n_steps: int, seed: int, m: int = M, conflict: bool = True) -> list[np.ndarray]:
    """Per-step gradients [M, B, K] with unequal task scales and some conflict."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_steps):
        g = rng.normal(size=(m, B, K))
        if conflict:
            g[1] = -0.6 * g[0] + 0.8 * g[1]
        out.append(g * SCALES[:m, None, None] * rng.uniform(0.5, 2.0))
    return out


def run(name: str, steps: list[np.ndarray], **opts):
    """Combined gradients and stats weights of the library over the steps."""
    bal = make_balancer(name, steps[0].shape[0], **opts)
    combined, weights = [], []
    for g in steps:
        combined.append(bal.combine(torch.tensor(g)).numpy())
        w = bal.stats()["weights"]
        weights.append(None if w is None else w.numpy())
    return bal, combined, weights


def np_project_simplex(v: np.ndarray) -> np.ndarray:
    lo, hi = v.min() - 1.0, v.max()
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if np.maximum(v - mid, 0).sum() > 1.0 else (lo, mid)
    return np.maximum(v - 0.5 * (lo + hi), 0)


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ----------------------------------------------------------------------------- simple ones
def test_equal_and_static():
    steps = random_steps(3, 0)
    _, comb, w = run("equal", steps)
    for g, c in zip(steps, comb):
        np.testing.assert_allclose(c, g.sum(0), rtol=1e-12)
    _, comb, w = run("static", steps, weights=[0.5, 0.0, 2.0])
    for g, c in zip(steps, comb):
        np.testing.assert_allclose(c, 0.5 * g[0] + 2.0 * g[2], rtol=1e-12)
    np.testing.assert_array_equal(w[0], [0.5, 0.0, 2.0])


@pytest.mark.parametrize("variant", ["full", "half"])
def test_uncertainty(variant):
    bal = make_balancer("uncertainty", 3, variant=variant)
    with torch.no_grad():
        bal.log_vars.copy_(torch.tensor([0.3, -0.2, 1.0]))
    losses = torch.tensor([0.7, 2.0, 0.1], dtype=torch.float64, requires_grad=True)
    total = bal.loss(losses)
    total.backward()
    s, L = np.array([0.3, -0.2, 1.0]), np.array([0.7, 2.0, 0.1])
    factor = 1.0 if variant == "full" else 0.5
    np.testing.assert_allclose(total.item(), factor * np.sum(np.exp(-s) * L + s), rtol=1e-6)
    np.testing.assert_allclose(losses.grad.numpy(), factor * np.exp(-s), rtol=1e-6)
    np.testing.assert_allclose(bal.log_vars.grad.numpy(), factor * (1 - np.exp(-s) * L), rtol=1e-6)
    g = random_steps(1, 1)[0]
    np.testing.assert_allclose(bal.combine(torch.tensor(g)).numpy(), g.sum(0), rtol=1e-12)
    np.testing.assert_allclose(bal.stats()["weights"].numpy(), factor * np.exp(-s), rtol=1e-6)


# ----------------------------------------------------------------------------- multibalance
def np_multibalance(steps, beta, rho, gamma, ema, direction, gamma_schedule="constant"):
    """MultiBalance Algorithm 3, transcribed on explicit vectors. gamma_schedule "debiased":
    Adam's bias correction of an EMA started at zero, u_k = e_k / (1 - (1 - gamma)^k)."""
    m = steps[0].shape[0]
    lam0 = np.full(m, 1.0 / m)
    lam = lam0.copy()
    u = None
    e = np.zeros(m)  # the zero-started EMA behind the debiased u
    lams, combined = [], []
    for k, g in enumerate(steps, 1):
        G = g.reshape(m, -1)
        n = np.linalg.norm(G, axis=1)
        if ema and gamma_schedule == "debiased":
            e = (1 - gamma) * e + gamma * n
            u = e / (1 - (1 - gamma) ** k)
            V = np.stack([(u[i] / n[i]) * G[i] for i in range(m)])
        elif ema:
            u = n.copy() if u is None else (1 - gamma) * u + gamma * n
            V = np.stack([(u[i] / n[i]) * G[i] for i in range(m)])
        else:
            V = G.copy()
        target = sum((lam[j] + rho * lam0[j]) * V[j] for j in range(m))
        if direction == "cosine":
            d = np.array([cos(V[i], target) for i in range(m)])
        else:  # Eq. 12: d = Vᵀ(V lam + rho V lam0) in the paper's column convention
            d = V @ (V.T @ lam + rho * V.T @ lam0)
        lam = np_project_simplex(lam - beta * d)
        lams.append(lam.copy())
        combined.append((m * sum(lam[i] * V[i] for i in range(m))).reshape(g.shape[1:]))
    return lams, combined


@pytest.mark.parametrize("direction", ["cosine", "gradient"])
@pytest.mark.parametrize("ema, gamma_schedule", [(True, "debiased"), (True, "constant"), (False, "debiased")])
def test_multibalance_lambda_trajectory(direction, ema, gamma_schedule):
    steps = random_steps(20, 2)
    opts = dict(beta=0.5, rho=0.1, gamma=0.2, ema=ema, direction=direction, gamma_schedule=gamma_schedule)
    if direction == "gradient":  # raw inner products: keep beta * d of order 1
        opts["beta"] = 0.02
    bal = make_balancer("multibalance", M, **opts)
    exp_lams, exp_comb = np_multibalance(steps, **opts)
    for g, lam, comb in zip(steps, exp_lams, exp_comb):
        out = bal.combine(torch.tensor(g)).numpy()
        np.testing.assert_allclose(bal.lambdas.numpy(), lam, atol=1e-10)
        np.testing.assert_allclose(out, comb, rtol=1e-9, atol=1e-12)
    assert len({tuple(np.round(l, 6)) for l in exp_lams}) > 5  # lambda actually moves


def test_multibalance_defaults_and_uniform_start():
    bal = make_balancer("multibalance", 2, beta=0.0, ema=False)
    g = random_steps(1, 3, m=2)[0]
    np.testing.assert_allclose(bal.combine(torch.tensor(g)).numpy(), g.sum(0), rtol=1e-12)
    bal = make_balancer("multibalance", 4)
    assert (bal.beta, bal.rho, bal.gamma, bal.ema, bal.direction) == (0.001, 0.1, 0.01, True, "cosine")
    assert bal.gamma_schedule == "constant"


def test_multibalance_advises_on_its_moving_average_at_every_run_length():
    """The held-out losses were measured at 1.5 to 25 memories of u: no length is exempt."""
    bal = make_balancer("multibalance", 3)  # gamma 0.01: u remembers ~100 steps
    short, long = bal.run_advice(152), bal.run_advice(2_488)
    assert short.startswith("multibalance: this run has 152 steps, 1.5x the ~100 steps")
    assert long.startswith("multibalance: this run has 2488 steps, 24.9x the ~100 steps")
    assert "balance.options.ema = false turns it off" in short
    assert "never forgets" in make_balancer("multibalance", 3, gamma=0.0).run_advice(10)
    assert make_balancer("multibalance", 3, ema=False).run_advice(152) is None  # no rescaling, nothing to say
    assert make_balancer("multibalance", 3, gamma=1.0).run_advice(152) is None  # u is the norm itself: v = g
    assert make_balancer("equal", 3).run_advice(1) is None


def test_multibalance_debiased_norms_are_the_running_mean_early_on():
    """With the debiased schedule u is the norms' mean while k << 1/gamma (gamma = 0: exactly),
    not the first step's norm kept for ~1/gamma steps (the "constant" schedule)."""
    def u_after(norms, **options):
        bal = make_balancer("multibalance", 1, beta=0.0, **options)
        for n in norms:
            bal.combine(torch.full((1, 1, 1), n, dtype=torch.float64))
        return bal.ema_norms.item()

    norms = [4.0, 1.0, 1.0, 1.0]  # mean 1.75
    assert u_after(norms, gamma=0.0, gamma_schedule="debiased") == pytest.approx(1.75, rel=1e-12)
    assert u_after(norms, gamma=0.001, gamma_schedule="debiased") == pytest.approx(1.75, rel=2e-3)
    assert u_after(norms, gamma=0.001) == pytest.approx(4.0, rel=3e-3)  # "constant", the default
    with pytest.raises(ValueError, match="gamma_schedule"):
        make_balancer("multibalance", 2, gamma_schedule="linear")


# ----------------------------------------------------------------------------- cograd
def np_cograd(g, gamma, w, form, per_sample, b_global):
    """CoGrad Eq. 10 with Eq. 11, element by element over [B, K]."""
    m = g.shape[0]
    p = g * b_global if per_sample else g
    out = np.zeros(g.shape[1:])
    for i in range(m):
        g_hat = g[i].copy()
        for j in range(m):
            if j == i:
                continue
            h_ij = p[i] * p[i] * g[j] if form == "fisher" else p[i] * g[j]
            g_hat -= gamma[j] * h_ij
        out += w[i] * g_hat
    return out


@pytest.mark.parametrize("form", ["fisher", "algorithm1"])
@pytest.mark.parametrize("per_sample", [True, False])
def test_cograd(form, per_sample):
    steps = [s * 0.05 for s in random_steps(2, 4)]
    gamma, w = [0.1, 0.3, 0.05], [1.0, 0.5, 2.0]
    _, comb, weights = run("cograd", steps, gamma=gamma, weights=w, form=form, per_sample=per_sample)
    for g, c in zip(steps, comb):
        np.testing.assert_allclose(c, np_cograd(g, gamma, w, form, per_sample, B), rtol=1e-10, atol=1e-14)
    np.testing.assert_array_equal(weights[0], w)


def test_cograd_gamma_is_batch_size_invariant():
    """Duplicating every sample (batch 2B, gradient rows halved) leaves the per-sample correction
    unchanged: the combined gradient rows are exactly halved."""
    g = random_steps(1, 5)[0] * 0.1
    doubled = np.concatenate([g, g], axis=1) / 2
    _, c1, _ = run("cograd", [g], gamma=0.5)
    _, c2, _ = run("cograd", [doubled], gamma=0.5)
    np.testing.assert_allclose(c2[0][:B], c1[0] / 2, rtol=1e-12)


# ----------------------------------------------------------------------------- pcgrad, gradvac
def np_pcgrad(g, order):
    """Yu et al. 2020, Algorithm 1: sequential projection on flattened vectors."""
    m = g.shape[0]
    G = g.reshape(m, -1)
    pc = G.copy()
    for i in range(m):
        for j in order[i]:
            dot = pc[i] @ G[j]
            if dot < 0:
                pc[i] = pc[i] - dot / (G[j] @ G[j]) * G[j]
    return pc.sum(0).reshape(g.shape[1:])


def test_pcgrad_matches_sequential_projection():
    steps = random_steps(6, 6, m=4)
    bal, comb, weights = run("pcgrad", steps, seed=11)
    for t, (g, c) in enumerate(zip(steps, comb)):
        exp = np_pcgrad(g, task_orders(4, 11, t))
        np.testing.assert_allclose(c, exp, rtol=1e-9, atol=1e-12)
        # weights are the effective multipliers: combined = sum_m w_m g_m
        np.testing.assert_allclose(np.tensordot(weights[t], g, 1), exp, rtol=1e-9, atol=1e-12)
    orders = [task_orders(4, 11, t) for t in range(6)]
    assert len({str(o) for o in orders}) > 1  # the order changes with the step


def np_gradvac(steps, beta, seed):
    """Wang et al. 2021 (GradVac), sequential on flattened vectors, EMA targets from 0."""
    m = steps[0].shape[0]
    targets = np.zeros((m, m))
    out = []
    for t, g in enumerate(steps):
        G = g.reshape(m, -1)
        pc = G.copy()
        for i, order in enumerate(task_orders(m, seed, t)):
            for j in order:
                phi = cos(pc[i], G[j])
                tgt = targets[i, j]
                if phi < tgt:
                    coef = (np.linalg.norm(pc[i]) * (tgt * np.sqrt(1 - phi**2) - phi * np.sqrt(1 - tgt**2))
                            / (np.linalg.norm(G[j]) * np.sqrt(1 - tgt**2)))
                    pc[i] = pc[i] + coef * G[j]
                targets[i, j] = (1 - beta) * tgt + beta * phi
        out.append(pc.sum(0).reshape(g.shape[1:]))
    return out, targets


def test_gradvac():
    steps = random_steps(12, 7, conflict=False)
    beta = 0.3  # large so the targets rise above observed cosines and corrections happen
    bal, comb, _ = run("gradvac", steps, beta=beta, seed=5)
    exp, targets = np_gradvac(steps, beta, 5)
    for c, e in zip(comb, exp):
        np.testing.assert_allclose(c, e, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(bal.targets.numpy(), targets, atol=1e-12)
    assert any(not np.allclose(c, g.sum(0)) for c, g in zip(comb, steps))  # some correction


# ----------------------------------------------------------------------------- graddrop
@pytest.mark.parametrize("leak", [0.0, [0.0, 0.5, 1.0]])
def test_graddrop(leak):
    steps = random_steps(3, 8)
    _, comb, weights = run("graddrop", steps, leak=leak, seed=9)
    leaks = np.broadcast_to(np.array(leak, dtype=np.float64), (M,))
    for t, (g, c) in enumerate(zip(steps, comb)):
        u = torch.rand(g.shape[1:], generator=step_generator(9, t, "cpu", salt=0), dtype=torch.float64).numpy()
        P = 0.5 * (1 + g.sum(0) / np.abs(g).sum(0))
        exp = np.zeros(g.shape[1:])
        for i in range(M):
            mask = (P > u) * (g[i] > 0) + (P < u) * (g[i] < 0)
            exp += (leaks[i] + (1 - leaks[i]) * mask) * g[i]
        np.testing.assert_allclose(c, exp, rtol=1e-12, atol=1e-15)
    assert weights[0] is None


# ----------------------------------------------------------------------------- mgda
def test_mgda_is_min_norm_of_convex_hull():
    steps = random_steps(3, 9)
    grid = np.array([(a, b, 1 - a - b) for a in np.linspace(0, 1, 301) for b in np.linspace(0, 1, 301)
                     if a + b <= 1 + 1e-12])
    grid[:, 2] = np.clip(grid[:, 2], 0, None)
    _, comb, weights = run("mgda", steps)
    for g, c, w in zip(steps, comb, weights):
        G = g.reshape(M, -1)
        best = min(np.linalg.norm(a @ G) for a in grid)
        assert np.linalg.norm(c) <= best + 1e-12
        assert np.linalg.norm(c) >= best - 1e-3
        np.testing.assert_allclose(c, np.tensordot(w, g, 1), rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- cagrad
def np_cagrad(g, c, rescale):
    """CAGrad (Liu et al. 2021): dual solved with SLSQP as in the authors' code."""
    m = g.shape[0]
    G = g.reshape(m, -1).T  # columns = task gradients
    GG = G.T @ G
    g0_norm = np.sqrt(GG.mean())
    b = np.ones(m) / m
    radius = c * g0_norm

    def obj(x):
        return x @ GG @ b + radius * np.sqrt(x @ GG @ x)

    res = minimize(obj, b.copy(), bounds=[(0, 1)] * m,
                   constraints={"type": "eq", "fun": lambda x: 1 - x.sum()},
                   method="SLSQP", options={"ftol": 1e-14, "maxiter": 1000})
    w = res.x
    gw = G @ w
    lam = radius / np.linalg.norm(gw)
    d = G.mean(1) + lam * gw
    d = d / {0: 1.0, 1: 1 + c**2, 2: 1 + c}[rescale]
    return d.reshape(g.shape[1:]), obj(w)


@pytest.mark.parametrize("c,rescale", [(0.5, 1), (0.2, 0), (0.9, 2)])
def test_cagrad(c, rescale):
    steps = random_steps(3, 10)
    _, comb, _ = run("cagrad", steps, c=c, rescale=rescale)
    for g, out in zip(steps, comb):
        exp, _ = np_cagrad(g, c, rescale)
        np.testing.assert_allclose(out, exp, rtol=1e-4, atol=1e-6 * np.abs(exp).max())


# ----------------------------------------------------------------------------- imtl_g
def test_imtl_g():
    steps = random_steps(3, 11, m=4)
    _, comb, weights = run("imtl_g", steps)
    for g, c, w in zip(steps, comb, weights):
        G = g.reshape(4, -1)
        U_unit = G / np.linalg.norm(G, axis=1, keepdims=True)
        D = G[0][None] - G[1:]
        U = U_unit[0][None] - U_unit[1:]
        alpha_rest = G[0] @ U.T @ np.linalg.inv(D @ U.T)
        alpha = np.concatenate([[1 - alpha_rest.sum()], alpha_rest])
        exp = alpha @ G
        np.testing.assert_allclose(w, alpha, rtol=1e-8)
        np.testing.assert_allclose(c.reshape(-1), exp, rtol=1e-8, atol=1e-12)
        proj = U_unit @ exp  # the defining property: equal projections on every unit gradient
        np.testing.assert_allclose(proj, proj[0], rtol=1e-8)



def test_imtl_g_singular_system_takes_the_pseudo_inverse():
    """Equal gradients make D Uᵀ singular: the least-squares (pinv) solution is used, and
    any weights summing to 1 give the same combined gradient."""
    G = np.array([[2.0, 0.0], [2.0, 0.0], [0.0, 3.0]])  # tasks 1 and 2 equal
    U_unit = G / np.linalg.norm(G, axis=1, keepdims=True)
    D, U = G[0][None] - G[1:], U_unit[0][None] - U_unit[1:]
    rest = G[0] @ U.T @ np.linalg.pinv(D @ U.T)
    np.testing.assert_allclose(imtl_g_values((G @ G.T).tolist()), [1 - rest.sum(), *rest], rtol=1e-12)
    g = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = make_balancer("imtl_g", 2).combine(torch.stack([g, g]))
    torch.testing.assert_close(out, g)


# ----------------------------------------------------------------------------- dbmtl
def test_dbmtl_combine():
    steps = random_steps(6, 12)
    beta, sigma = 0.8, 0.5
    _, comb, _ = run("dbmtl", steps, beta=beta, beta_sigma=sigma)
    ema = None
    for t, (g, c) in enumerate(zip(steps, comb), start=1):
        G = g.reshape(M, -1)
        n = np.linalg.norm(G, axis=1)
        bt = beta / t**sigma
        ema = n.copy() if ema is None else bt * ema + (1 - bt) * n
        exp = ema.max() * sum(G[i] / n[i] for i in range(M))
        np.testing.assert_allclose(c.reshape(-1), exp, rtol=1e-10)


def test_dbmtl_loss_is_log_transform():
    bal = make_balancer("dbmtl", 3)
    losses = torch.tensor([0.5, 2.0, 0.01], dtype=torch.float64, requires_grad=True)
    total = bal.loss(losses)
    total.backward()
    L = np.array([0.5, 2.0, 0.01])
    np.testing.assert_allclose(total.item(), np.log(L + 1e-8).sum(), rtol=1e-12)
    np.testing.assert_allclose(losses.grad.numpy(), 1 / (L + 1e-8), rtol=1e-12)


# ----------------------------------------------------------------------------- nashmtl
def test_nashmtl():
    steps = random_steps(4, 13, m=4)
    _, comb, weights = run("nashmtl", steps)
    for g, c, w in zip(steps, comb, weights):
        G = g.reshape(4, -1)
        GTG = G @ G.T
        GTG = GTG / np.linalg.norm(GTG)  # authors' normalisation (Frobenius)
        # independent solve: minimise ½ aᵀKa - sum log a with scipy
        res = minimize(lambda a: 0.5 * a @ GTG @ a - np.log(a).sum(), np.ones(4),
                       jac=lambda a: GTG @ a - 1 / a, bounds=[(1e-9, None)] * 4,
                       method="L-BFGS-B", options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 10000})
        np.testing.assert_allclose(w, res.x, rtol=1e-5)
        np.testing.assert_allclose(GTG @ w, 1 / w, rtol=1e-8)
        np.testing.assert_allclose(c.reshape(-1), w @ G, rtol=1e-9, atol=1e-12)


def test_nashmtl_zero_gradient_task_gets_zero_weight():
    g = random_steps(1, 14)[0]
    g[2] = 0
    _, comb, weights = run("nashmtl", [g])
    assert weights[0][2] == 0 and np.all(weights[0][:2] > 0)
    assert np.all(np.isfinite(comb[0]))


def test_cograd_prior_entropy_weights_make_each_task_loss_an_ne():
    """w_i = 1 / H(p_i): a task's weighted log loss is its NE (the paper's loss weights from the
    prior cross-entropy)."""
    import math

    from balancing import TaskInfo

    bal = make_balancer("cograd", 2, weights="prior_entropy", gamma=0.0)
    assert bal.needs_label_rates
    with pytest.raises(RuntimeError, match="bind_tasks"):
        bal.combine(torch.randn(2, 4, 3))
    bal.bind_tasks(TaskInfo(("click", "buy"), (0.5, 0.1)))
    h = [math.log(2), -(0.1 * math.log(0.1) + 0.9 * math.log(0.9))]
    assert bal.weights == pytest.approx([1 / h[0], 1 / h[1]])
    g = torch.randn(2, 4, 3, dtype=torch.float64)
    torch.testing.assert_close(bal.combine(g), g[0] / h[0] + g[1] / h[1])
    with pytest.raises(ValueError, match="'weights' must be 2 numbers >= 0 or 'prior_entropy'"):
        make_balancer("cograd", 2, weights="entropy")
    assert not make_balancer("cograd", 2).needs_label_rates


def test_multibalance_prior_and_output_scale():
    """λ starts at the prior λ0, which also enters the update's ρλ0 term; output="average"
    is the paper's Σλv, "sum" M·Σλv."""
    g = torch.randn(2, 8, 3, dtype=torch.float64)
    avg = make_balancer("multibalance", 2, prior=[3.0, 1.0], output="average", beta=0.0, ema=False)
    total = make_balancer("multibalance", 2, prior=[3.0, 1.0], beta=0.0, ema=False)
    assert avg.lambdas.tolist() == [0.75, 0.25]
    torch.testing.assert_close(avg.combine(g), 0.75 * g[0] + 0.25 * g[1])
    torch.testing.assert_close(total.combine(g), 2 * (0.75 * g[0] + 0.25 * g[1]))
    for bad, needle in (([1.0], "one entry per task"), ([0.0, 0.0], "positive sum"), ([-1.0, 2.0], r"'prior\[0\]'")):
        with pytest.raises(ValueError, match=needle):
            make_balancer("multibalance", 2, prior=bad)


def test_cograd_tracks_the_size_of_its_correction():
    bal = make_balancer("cograd", 2, gamma=[50.0, 20.0], track_correction=True)
    g = torch.randn(2, 16, 4, dtype=torch.float64) * 1e-2
    out = bal.combine(g)
    plain = g[0] + g[1]
    expected = float((out - plain).norm() / plain.norm())
    assert expected > 1e-3
    assert bal.extra_stats()["correction_ratio_last"] == pytest.approx(expected, rel=1e-9)
    g2 = torch.randn(2, 16, 4, dtype=torch.float64) * 1e-2
    out2 = bal.combine(g2)
    second = float((out2 - g2.sum(0)).norm() / g2.sum(0).norm())
    stats = bal.extra_stats()
    assert stats["correction_steps"] == 2 and stats["correction_ratio_last"] == pytest.approx(second, rel=1e-9)
    assert stats["correction_ratio_mean"] == pytest.approx((expected + second) / 2, rel=1e-9)
    assert make_balancer("cograd", 2).extra_stats() == {}

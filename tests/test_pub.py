"""PUB (Parameter Update Balancing): one task is Adam, α solves (UᵀU)α = 1/α, an independent
NumPy transcription of the update, the recompute schedule and fallback, and 2 ranks vs one
process on the concatenated batch."""
from __future__ import annotations

import copy
import os
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from balancing import make_balancer
from tests.distributed_util import run_ranks
from tests import reference
from trainer.core.trainer import task_losses

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- one task = Adam
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-13)])
def test_one_task_is_adam(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(40, generator=gen, dtype=dtype)
    ours, ref = start.clone(), torch.nn.Parameter(start.clone())
    adam = torch.optim.Adam([ref], lr=0.01, betas=(0.8, 0.99), eps=1e-6)
    pub = make_balancer("pub", 1, every=3, betas=[0.8, 0.99], eps=1e-6)
    for _ in range(25):
        g = torch.randn(40, generator=gen, dtype=dtype) * 3
        ours.add_(pub.combine(g.view(1, 1, 40)).reshape(-1), alpha=-0.01)
        ref.grad = g.clone()
        adam.step()
        assert float(pub.alpha[0]) == 1.0
    state = adam.state[ref]
    torch.testing.assert_close(ours, ref.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(pub.exp_avg, state["exp_avg"], rtol=tol, atol=tol)
    torch.testing.assert_close(pub.exp_avg_sq, state["exp_avg_sq"], rtol=tol, atol=tol)
    assert pub.steps_done == int(state["step"]) == 25


# ----------------------------------------------------------------------------- α
@pytest.mark.parametrize("m", [2, 3, 4, 5])
def test_alpha_solves_nash_system_on_random_updates(m):
    rng = np.random.default_rng(m)
    for trial in range(5):
        u = rng.normal(size=(m, 30)) * rng.uniform(0.1, 10.0, size=(m, 1))
        pub = make_balancer("pub", m)
        gram = torch.tensor(u @ u.T)
        alpha = pub.solve(gram).numpy()
        k = u @ u.T / np.linalg.norm(u @ u.T)  # Frobenius normalisation, as the reference code
        assert (alpha > 0).all()
        np.testing.assert_allclose(k @ alpha, 1.0 / alpha, rtol=1e-7)
        assert int(pub.failed_solves) == 0


def test_alpha_from_combine_uses_the_adam_updates():
    """Inside `combine`, α solves the system for U = the per-task Adam updates (not the gradients)."""
    rng = np.random.default_rng(3)
    pub = make_balancer("pub", 3, every=1)
    pub.reset_state(20, torch.float64)
    for _ in range(3):
        g = torch.tensor(rng.normal(size=(3, 1, 20)) * np.array([1.0, 5.0, 0.2])[:, None, None])
        u = pub.task_updates(g.reshape(3, -1)).numpy()
        pub.combine(g)
        k = u @ u.T / np.linalg.norm(u @ u.T)
        a = pub.alpha.numpy()
        np.testing.assert_allclose(a * (k @ a), 1.0, rtol=1e-7)


def np_pub(steps, every, b1=0.9, b2=0.999, eps=1e-8, step="adam", normalize=True):
    """Independent transcription: per-task Adam updates from fixed moments, α minimising
    ½αᵀKα − Σ log α (scipy), combined update (rescaled to the norm of Adam's update of the
    summed gradient for step="adam"), moments from the α-weighted gradient."""
    m_tasks, p = steps[0].shape
    m, v, alpha = np.zeros(p), np.zeros(p), np.ones(m_tasks)

    def adam(g, t):
        mt = b1 * m + (1 - b1) * g
        vt = b2 * v + (1 - b2) * g * g
        return (mt / (1 - b1 ** t)) / (np.sqrt(vt) / np.sqrt(1 - b2 ** t) + eps)

    out = []
    for t, g in enumerate(steps, start=1):
        u = adam(g, t)
        if (t - 1) % every == 0:
            k = u @ u.T
            if normalize:
                k = k / np.linalg.norm(k)
            res = minimize(lambda a: 0.5 * a @ k @ a - np.log(a).sum(), alpha,
                           jac=lambda a: k @ a - 1 / a, bounds=[(1e-12, None)] * m_tasks, tol=1e-14,
                           method="L-BFGS-B", options={"maxiter": 1000, "gtol": 1e-13, "ftol": 1e-15})
            alpha = res.x
        used = alpha
        if step == "adam":
            used = alpha * np.linalg.norm(adam(g.sum(axis=0), t)) / np.linalg.norm(alpha @ u)
        out.append((alpha.copy(), used @ u))
        ga = used @ g
        m = b1 * m + (1 - b1) * ga
        v = b2 * v + (1 - b2) * ga * ga
    return out


@pytest.mark.parametrize("step, normalize", [("adam", True), ("solved", True), ("solved", False)])
def test_matches_numpy_transcription(step, normalize):
    rng = np.random.default_rng(11)
    steps = []
    for _ in range(7):
        g = rng.normal(size=(3, 25))
        g[1] = -0.5 * g[0] + 0.9 * g[1]
        steps.append(g * np.array([1.0, 3.0, 0.3])[:, None])
    expected = np_pub(steps, every=3, step=step, normalize=normalize)
    pub = make_balancer("pub", 3, every=3, step=step, normalize=normalize)
    for g, (alpha, combined) in zip(steps, expected):
        got = pub.combine(torch.tensor(g).unsqueeze(1)).reshape(-1).numpy()
        np.testing.assert_allclose(pub.alpha.numpy(), alpha, rtol=1e-5)
        np.testing.assert_allclose(got, combined, rtol=1e-5, atol=1e-8)
    stats = pub.stats()
    scale = pub.extra_stats()["step_scale"]
    torch.testing.assert_close(stats["weights"], pub.alpha * scale)
    np.testing.assert_allclose(stats["grad_norms"].numpy(), np.linalg.norm(steps[-1], axis=1), rtol=1e-10)


def test_adam_step_size_makes_the_normalisation_irrelevant():
    """Frobenius normalisation (authors' code) or none (paper) only scales α, so with the update
    rescaled to Adam's step the two give the same updates."""
    rng = np.random.default_rng(5)
    a, b = make_balancer("pub", 2, every=2, normalize=True), make_balancer("pub", 2, every=2, normalize=False)
    for _ in range(5):
        g = torch.tensor(rng.normal(size=(2, 1, 30)) * np.array([1.0, 4.0])[:, None, None])
        torch.testing.assert_close(a.combine(g), b.combine(g), rtol=1e-6, atol=1e-9)
    assert not torch.allclose(a.alpha, b.alpha)


def test_alpha_recomputed_every_k_steps_and_failures_keep_previous():
    rng = np.random.default_rng(5)
    pub = make_balancer("pub", 2, every=4)
    seen = []
    for _ in range(8):
        pub.combine(torch.tensor(rng.normal(size=(2, 1, 10)) * np.array([1.0, 4.0])[:, None, None]))
        seen.append(pub.alpha.clone())
    assert all(torch.equal(seen[0], a) for a in seen[1:4])
    assert not torch.equal(seen[3], seen[4])
    assert all(torch.equal(seen[4], a) for a in seen[5:8])
    assert int(pub.solves) == 2
    # exactly opposite updates: (UᵀU) singular, no positive solution -> keep α, count it
    before = pub.alpha.clone()
    g = rng.normal(size=10)
    pub.every = 1
    pub.exp_avg.zero_()
    pub.exp_avg_sq.zero_()
    pub.combine(torch.tensor(np.stack([g, -g])[:, None, :]))
    assert int(pub.failed_solves) == 1
    assert torch.equal(pub.alpha, before)
    assert pub.extra_stats()["failed_solves"] == 1


def test_state_dict_round_trip_resizes_moments():
    rng = np.random.default_rng(2)
    steps = [torch.tensor(rng.normal(size=(2, 1, 12))) for _ in range(6)]
    pub = make_balancer("pub", 2, every=2)
    for g in steps[:3]:
        pub.combine(g)
    state = copy.deepcopy(pub.state_dict())
    assert {"exp_avg", "exp_avg_sq", "alpha", "failed_solves", "step"} <= set(state)
    expected = [pub.combine(g) for g in steps[3:]]
    restored = make_balancer("pub", 2, every=2)
    restored.load_state_dict(state)  # its moments are empty until loaded
    for e, g in zip(expected, steps[3:]):
        assert torch.equal(e, restored.combine(g))


def test_bad_options_name_the_option():
    with pytest.raises(ValueError, match="'betas'"):
        make_balancer("pub", 2, betas=[0.9])
    with pytest.raises(ValueError, match="'every'"):
        make_balancer("pub", 2, every=0)


# ----------------------------------------------------------------------------- 2 ranks = 1 process
STEPS = int(os.environ.get("RECBALANCE_PUB_TEST_STEPS", "5"))


def tiny_config(data: Path) -> dict:
    return reference.tiny_config(data, "table_wise", "mmoe", "pub", steps=STEPS, options={"every": 2})


def sharded_run(config: dict):
    from trainer.run.distributed import shutdown_distributed
    from trainer.observe.metrics import global_mean

    trainer = reference.sharded_trainer(config, "out-pub")
    losses, alphas, shared = [], [], []
    for _ in range(STEPS):
        result = trainer.train_step(next(trainer.stream))
        losses.append(global_mean(result.losses).tolist())
        alphas.append(trainer.balancer.stats()["weights"].tolist() + trainer.balancer.alpha.tolist())
        shared.append(torch.cat([p.detach().reshape(-1) for p in trainer.param_level.params]).tolist())
    keys = [f"balancer.{k}" for k in trainer.state_dict().get("balancer", {})]
    shutdown_distributed()
    return losses, alphas, shared, keys


def reference_run(config: dict):
    from balancing.methods.pub import PUBStep

    cfg, schema, model, opts = reference.reference_model(config)
    pub = PUBStep(model.shared_dense_parameters(), make_balancer("pub", 2, every=2), cfg.train.dense_lr)
    owned = {id(p) for p in pub.params}
    embedding = [p for n, p in model.named_parameters() if "embedding_bag_collection" in n]
    dense = [p for n, p in model.named_parameters() if "embedding_bag_collection" not in n and id(p) not in owned]
    opts = [torch.optim.SGD(embedding, lr=cfg.train.embedding_lr), torch.optim.Adam(dense, lr=cfg.train.dense_lr)]
    batches = reference.global_batches(cfg, schema)
    losses, alphas, shared = [], [], []
    for _ in range(STEPS):
        batch = next(batches)
        logits = model(batch.dense, batch.sparse)
        step_losses = task_losses(logits, batch)
        for opt in opts:
            opt.zero_grad()
        objective = step_losses.sum()
        per_task = pub.per_task_gradients(step_losses, objective)
        objective.backward()
        pub.apply(per_task)
        for opt in opts:
            opt.step()
        losses.append(step_losses.tolist())
        alphas.append(pub.balancer.stats()["weights"].tolist() + pub.balancer.alpha.tolist())
        shared.append(torch.cat([p.detach().reshape(-1) for p in pub.params]).tolist())
    return losses, alphas, shared


def test_two_ranks_agree_and_match_one_process(tiny_dataset):
    config = tiny_config(tiny_dataset)
    exp_losses, exp_alphas, exp_shared = reference_run(config)
    got = run_ranks(sharded_run, 2, config)
    assert got[0] == got[1]  # α, losses and the shared parameters are identical on both ranks
    losses, alphas, shared, keys = got[0]
    assert "balancer.exp_avg" in keys  # PUB state is checkpointed
    # Every step (α solved on the global-batch updates, PUB update applied, losses of the next
    # forward) matches one process to float tolerance.
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(exp_losses), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(alphas), torch.tensor(exp_alphas), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.tensor(shared), torch.tensor(exp_shared), rtol=1e-5, atol=1e-6)
    # each row: the effective weights (α times the step scale), then the solved α
    assert exp_alphas[0][2:] != exp_alphas[2][2:]  # recomputed at step 3 (every = 2)
    assert exp_alphas[2][2:] == exp_alphas[3][2:] and alphas[2][2:] == alphas[3][2:]  # reused between


def test_cli_trains_from_census_pub_config(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    sets = [f'data.path="{tiny_dataset}"', "data.global_batch_size=64", "data.eval_batch_size=256", "train.steps=8",
            "train.log_every=4", "model.num_experts=2", "model.expert_layers=[8]", "model.shared_layers=[16]",
            "model.dense_layers=[8]", "model.tower_layers=[4]", "balance.options.every=3"]
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.run.cli", "train", "--config", "configs/census_pub.toml",
         *[a for s in sets for a in ("--set", s)], "--output-dir", str(out), "--nproc-per-node", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "pub" and summary["steps"] == 8
    extra = summary["balance_extra"]
    assert extra["solves"] == 3 and extra["failed_solves"] == 0
    assert all(a > 0 for a in extra["alpha"])
    assert set(summary["weights"]) == {"click", "conversion"}


def test_weight_decay_is_split_over_the_tasks_gradients():
    """PUBStep with weight decay w: as if each of the M task gradients carried w·p/M (their sum:
    Adam's L2 term w·p on the summed loss)."""
    from balancing.methods.pub import PUBStep

    torch.manual_seed(0)
    start = torch.randn(6, dtype=torch.float64)
    per_task = torch.randn(2, 6, dtype=torch.float64)
    with_decay = torch.nn.Parameter(start.clone())
    by_hand = torch.nn.Parameter(start.clone())
    PUBStep([with_decay], make_balancer("pub", 2), 0.01, weight_decay=0.5).apply(per_task)
    PUBStep([by_hand], make_balancer("pub", 2), 0.01).apply(per_task + 0.25 * start)
    torch.testing.assert_close(with_decay.detach(), by_hand.detach())
    assert not torch.equal(with_decay.detach(), start)

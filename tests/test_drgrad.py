"""DRGrad: the router's four cases (Table 1, as transcribed — see docs/methods_pub_drgrad.md),
the updater (Eq. 7), routing inside the one backward pass, several secondary tasks, 2 ranks vs
one process, and `recbalance train` from the shipped configs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from balancing import DRGradPoint, make_balancer
from tests.distributed_util import run_ranks
from tests import reference

ROOT = Path(__file__).resolve().parents[1]


def np_route(g1p, g1pp, g2, gamma=1.0, clip=1.0):
    """Independent transcription (one secondary task): expected (grad v1, grad vs, case)."""
    cos = lambda a, b: float(a.ravel() @ b.ravel() / (np.linalg.norm(a) * np.linalg.norm(b)))  # noqa: E731
    n = np.linalg.norm
    xi1, xi2 = cos(g1p, g2), cos(g1pp, g2)
    lam1 = min(clip, (n(g1p) / n(g2)) ** gamma)
    lam2 = min(clip, (n(g1pp) / n(g1p)) ** gamma)
    r1 = lam1 * g2 if xi1 > 0 else 0 * g2
    r2 = lam2 * g1p if xi2 > 0 else 0 * g1p
    case = {(True, True): 1, (True, False): 2, (False, True): 3, (False, False): 4}[(xi1 > 0, xi2 > 0)]
    return g1p + r1, g1pp + r2 + g2, case, n(g1p + r1), n(g1pp + r2)


# Hand-built gradients [B=2, D=2], one per case of Table 1.
CASES = {
    1: ([[1.0, 0.0], [0.5, 0.0]], [[0.5, 0.5], [0.0, 0.2]], [[2.0, 1.0], [1.0, 0.0]]),    # ξ1>0, ξ2>0
    2: ([[1.0, 0.0], [0.5, 0.0]], [[-1.0, 0.5], [0.0, 0.0]], [[2.0, 1.0], [1.0, 0.0]]),   # ξ1>0, ξ2≤0
    3: ([[-1.0, 0.0], [0.0, 0.3]], [[0.5, 0.5], [0.0, 0.2]], [[2.0, 1.0], [1.0, 0.0]]),   # ξ1≤0, ξ2>0
    4: ([[-1.0, 0.0], [0.0, 0.3]], [[-1.0, 0.5], [0.0, 0.0]], [[2.0, 1.0], [1.0, 0.0]]),  # ξ1≤0, ξ2≤0
}


@pytest.mark.parametrize("case", [1, 2, 3, 4])
@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_router_reproduces_table_1(case, gamma):
    g1p, g1pp, g2 = (np.array(x) for x in CASES[case])
    exp_v1, exp_vs, exp_case, *_ = np_route(g1p, g1pp, g2, gamma=gamma)
    assert exp_case == case
    bal = make_balancer("drgrad", 2, gamma=gamma)
    v1, vs = bal.route(torch.tensor(g1p), torch.tensor(g1pp), torch.tensor(g2).unsqueeze(0))
    np.testing.assert_allclose(v1.numpy(), exp_v1, rtol=1e-12)
    np.testing.assert_allclose(vs.numpy(), exp_vs, rtol=1e-12)
    assert bal.extra_stats()["case"] == [float(case)]
    if case == 4:  # conflict everywhere: plain split-MMoE gradients
        np.testing.assert_array_equal(v1.numpy(), g1p)
        np.testing.assert_array_equal(vs.numpy(), g1pp + g2)


def test_lambda_is_clipped():
    g1p, g1pp, g2 = np.array([[3.0, 0.0]]), np.array([[1.0, 1.0]]), np.array([[1.0, 0.5]])
    bal = make_balancer("drgrad", 2, clip=0.7)
    v1, _ = bal.route(torch.tensor(g1p), torch.tensor(g1pp), torch.tensor(g2).unsqueeze(0))
    assert bal.extra_stats()["lambda1"] == [0.7]  # (‖g1'‖/‖g2‖) = 2.68 > clip
    np.testing.assert_allclose(v1.numpy(), g1p + 0.7 * g2, rtol=1e-12)


@pytest.mark.parametrize("decay", [1.0, 0.9])
def test_updater_follows_eq_7(decay):
    rng = np.random.default_rng(0)
    bal = make_balancer("drgrad", 2, decay=decay)
    sigma = np.zeros(2)
    for _ in range(6):
        g1p, g1pp, g2 = (rng.normal(size=(4, 3)) * s for s in (1.0, 2.0, 0.5))
        *_, n1, n2 = np_route(g1p, g1pp, g2)
        mu_before = bal.mu.clone()
        bal.route(torch.tensor(g1p), torch.tensor(g1pp), torch.tensor(g2).unsqueeze(0))
        sigma = decay * sigma + np.array([n1, n2])  # σ' += ‖g1'+g'_R1‖, σ'' += ‖g1''+g''_R1‖
        mu = np.exp(sigma - sigma.max()) / np.exp(sigma - sigma.max()).sum()
        np.testing.assert_allclose(bal.sigma.numpy(), sigma, rtol=1e-12)
        np.testing.assert_allclose(bal.mu.numpy(), mu, rtol=1e-12)
        assert not torch.equal(mu_before, bal.mu)
    assert abs(float(bal.mu.sum()) - 1.0) < 1e-12


def test_several_secondary_tasks_mean_of_routed_parts():
    rng = np.random.default_rng(4)
    g1p, g1pp = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    sec = [g1p * 0.8 + rng.normal(size=(3, 4)) * 0.3, -g1p + rng.normal(size=(3, 4)) * 0.1, g1pp * 2.0]
    bal = make_balancer("drgrad", 4, primary=1)
    v1, vs = bal.route(torch.tensor(g1p), torch.tensor(g1pp), torch.tensor(np.stack(sec)))
    exp_v1, exp_vs = g1p.copy(), g1pp + sum(sec)
    for g in sec:
        one_v1, one_vs, *_ = np_route(g1p, g1pp, g)
        exp_v1 += (one_v1 - g1p) / 3
        exp_vs += (one_vs - g1pp - g) / 3
    np.testing.assert_allclose(v1.numpy(), exp_v1, rtol=1e-12)
    np.testing.assert_allclose(vs.numpy(), exp_vs, rtol=1e-12)
    assert len(bal.extra_stats()["xi1"]) == 3


def test_routing_happens_inside_the_backward_pass():
    torch.manual_seed(0)
    v1 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    vs = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w1p, w1pp, w2 = (torch.randn(3, dtype=torch.float64) for _ in range(3))
    bal = make_balancer("drgrad", 2)
    point = DRGradPoint(bal)
    a, (s0, s1) = point(v1, vs)
    ((a * w1p).sum() + (s0 * w1pp).sum() + (s1 * w2).sum()).backward()
    exp_v1, exp_vs, *_ = np_route(*(w.expand(5, 3).numpy() for w in (w1p, w1pp, w2)))
    np.testing.assert_allclose(v1.grad.numpy(), exp_v1, rtol=1e-12)
    np.testing.assert_allclose(vs.grad.numpy(), exp_vs, rtol=1e-12)
    assert bal.steps_done == 1 and point.last_balance_seconds > 0


def test_primary_by_name_and_bad_options():
    bal = make_balancer("drgrad", 2, primary="conversion")
    assert bal.resolve_primary(["click", "conversion"]) == 1
    with pytest.raises(ValueError, match="'primary'"):
        make_balancer("drgrad", 2, primary="nope").resolve_primary(["click", "conversion"])
    with pytest.raises(ValueError, match="'primary'"):
        make_balancer("drgrad", 2, primary=2)
    with pytest.raises(ValueError, match="'decay'"):
        make_balancer("drgrad", 2, decay=1.5)


# ----------------------------------------------------------------------------- 2 ranks = 1 process
STEPS = 4


def tiny_config(data: Path) -> dict:
    return reference.tiny_config(data, "table_wise", "mmoe", "drgrad", steps=STEPS, options={"primary": "click", "decay": 0.9})


def sharded_run(config: dict):
    from trainer.distributed import shutdown_distributed
    from trainer.metrics import global_mean

    trainer = reference.sharded_trainer(config, "out-drgrad")
    losses, mus = [], []
    for _ in range(STEPS):
        result = trainer.train_step(next(trainer.stream))
        losses.append(global_mean(result.losses).tolist())
        mus.append(trainer.balancer.mu.tolist())
    extra = trainer.balancer.extra_stats()
    shutdown_distributed()
    return losses, mus, extra


def reference_run(config: dict):
    cfg, schema, model, opts = reference.reference_model(config)
    assert model.ppnet is not None  # the synthetic schema marks user_id as personal
    batches = reference.global_batches(cfg, schema)
    losses, mus = [], []
    for step_losses in reference.reference_steps(model, opts, batches, STEPS):
        losses.append(step_losses.tolist())
        mus.append(model.balancer.mu.tolist())
    return losses, mus, model.balancer.extra_stats()


def test_two_ranks_agree_and_match_one_process(tiny_dataset):
    config = tiny_config(tiny_dataset)
    exp_losses, exp_mus, exp_extra = reference_run(config)
    got = run_ranks(sharded_run, 2, config)
    assert got[0] == got[1]  # identical routing decisions, μ and losses on both ranks
    losses, mus, extra = got[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(exp_losses), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(mus), torch.tensor(exp_mus), rtol=1e-5, atol=1e-7)
    assert extra["case"] == exp_extra["case"]
    np.testing.assert_allclose(extra["xi1"] + extra["xi2"], exp_extra["xi1"] + exp_extra["xi2"], rtol=1e-4, atol=1e-6)
    assert exp_mus[0] != [0.5, 0.5] and exp_losses[0] != exp_losses[-1]


# ----------------------------------------------------------------------------- CLI
def recbalance(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


TINY = ["data.global_batch_size=64", "data.eval_batch_size=256", "train.steps=8", "train.log_every=4",
        "model.num_experts=2", "model.expert_layers=[8]", "model.shared_layers=[16]", "model.dense_layers=[8]",
        "model.tower_layers=[4]"]


@pytest.mark.parametrize("config, extra_sets, nproc", [
    ("configs/synthetic_drgrad.toml", [], "2"),
    ("configs/census_drgrad.toml", ['balance.options.primary="conversion"'], "1"),  # census labels are absent
])
def test_cli_trains_from_shipped_configs(tiny_dataset, tmp_path, config, extra_sets, nproc):
    out = tmp_path / "run"
    sets = [f'data.path="{tiny_dataset}"', *TINY, *extra_sets]
    proc = recbalance("train", "--config", config, *[a for s in sets for a in ("--set", s)],
                      "--output-dir", str(out), "--nproc-per-node", nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "drgrad" and summary["steps"] == 8
    extra = summary["balance_extra"]
    assert abs(sum(extra["mu"]) - 1.0) < 1e-9 and extra["mu"] != [0.5, 0.5]
    assert extra["primary"] == (0 if "synthetic" in config else 1)
    for metrics in summary["tasks"].values():
        assert 0.0 <= metrics["auc"] <= 1.0


def test_cli_rejects_drgrad_without_mmoe(tiny_dataset, tmp_path):
    proc = recbalance("train", "--config", "configs/synthetic_drgrad.toml", "--set", f'data.path="{tiny_dataset}"',
                      "--set", "model.kind=shared_bottom", "--output-dir", str(tmp_path / "r"), "--nproc-per-node", "1")
    assert proc.returncode == 2
    assert "config key 'model.kind'" in proc.stderr and "Traceback" not in proc.stderr

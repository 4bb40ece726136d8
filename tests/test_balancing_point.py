"""BalancePoint contract, state_dict round trips and input validation of `balancing`."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from balancing import BalancePoint, Balancer, available_methods, make_balancer, method_options
from tests.state_util import flat_tensors


def _mlp(seed: int = 0):
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6))
    heads = nn.ModuleList([nn.Linear(6, 1), nn.Linear(6, 1)])
    return trunk, heads


def _losses(outs, y):
    return torch.stack([((o.squeeze(-1) - y[:, i]) ** 2).mean() for i, o in enumerate(outs)])


def test_equal_matches_sum_of_losses_exactly():
    trunk, heads = _mlp()
    ref_trunk, ref_heads = copy.deepcopy(trunk), copy.deepcopy(heads)
    x, y = torch.randn(16, 4), torch.randn(16, 2)

    bal = make_balancer("equal", 2)
    point = BalancePoint(bal)
    h = trunk(x)
    copies = point(h)
    assert len(copies) == 2 and all(torch.equal(c, h) for c in copies)
    total = bal.loss(_losses([head(c) for head, c in zip(heads, copies)], y))
    total.backward()

    h_ref = ref_trunk(x)
    ref_total = _losses([head(h_ref) for head in ref_heads], y).sum()
    ref_total.backward()

    assert torch.equal(total, ref_total)
    for p, q in zip(list(trunk.parameters()) + list(heads.parameters()),
                    list(ref_trunk.parameters()) + list(ref_heads.parameters())):
        assert torch.equal(p.grad, q.grad)
    assert point.last_balance_seconds > 0
    stats = bal.stats()
    assert torch.equal(stats["weights"], torch.ones(2, dtype=torch.float64))
    assert stats["grad_norms"].shape == (2,) and stats["cosines"].shape == (2, 2)


class _Recorder(Balancer):
    """Test balancer: records what the node hands to combine and returns the sum."""

    method_name = "recorder"

    def _combine(self, grads):
        self.seen = torch.stack(grads)
        return self.seen.sum(0)


def test_tuple_inputs_and_unread_tensor():
    torch.manual_seed(1)
    x = torch.randn(5, 3, requires_grad=True)
    a = x * 2.0                         # [5, 3]
    b = (x[:, :2] * 3.0).unsqueeze(-1)  # [5, 2, 1]
    rec = _Recorder(2)
    point = BalancePoint(rec)
    copies = point((a, b))
    assert len(copies) == 2 and all(isinstance(c, tuple) and len(c) == 2 for c in copies)
    (a0, b0), (a1, b1) = copies
    assert torch.equal(a0, a) and torch.equal(b1, b)
    # task 0 reads a and b, task 1 reads only a
    loss0 = (a0 * torch.arange(3.0)).sum() + (b0 ** 2).sum()
    loss1 = (a1 ** 2).sum()
    (loss0 + loss1).backward()

    seen = rec.seen
    assert seen.shape == (2, 5, 5)  # [M, B, 3 + 2*1]
    assert torch.equal(seen[0, :, :3], torch.arange(3.0).expand(5, 3))
    assert torch.allclose(seen[0, :, 3:], 2 * b.detach().squeeze(-1))
    assert torch.equal(seen[1, :, 3:], torch.zeros(5, 2))  # task 1 did not read b
    assert torch.allclose(seen[1, :, :3], 2 * a.detach())

    x_ref = x.detach().clone().requires_grad_(True)
    a_r, b_r = x_ref * 2.0, (x_ref[:, :2] * 3.0).unsqueeze(-1)
    ((a_r * torch.arange(3.0)).sum() + (b_r ** 2).sum() + (a_r ** 2).sum()).backward()
    assert torch.allclose(x.grad, x_ref.grad)


def test_inputs_without_grad_pass_through():
    point = BalancePoint(make_balancer("equal", 3))
    h = torch.randn(4, 2)
    copies = point(h)
    assert len(copies) == 3 and all(c is h for c in copies)
    leaf = torch.randn(4, 2, requires_grad=True)
    with torch.no_grad():
        copies = point(leaf)
    assert all(c is leaf for c in copies)


def test_balanced_gradient_reaches_upstream():
    """With a weighting method, upstream receives exactly the combined gradient."""
    torch.manual_seed(2)
    x = torch.randn(6, 3, requires_grad=True)
    bal = make_balancer("static", 2, weights=[0.25, 2.0])
    h0, h1 = BalancePoint(bal)(x)
    w0, w1 = torch.randn(3), torch.randn(3)
    ((h0 * w0).sum() + (h1 * w1).sum()).backward()
    assert torch.allclose(x.grad, (0.25 * w0 + 2.0 * w1).expand(6, 3))


_STATEFUL_OPTIONS = {"static": {"weights": [1.0, 0.5, 2.0]}, "graddrop": {"leak": 0.2, "seed": 3}}


@pytest.mark.parametrize("name", available_methods())
def test_state_dict_round_trip_restores_behaviour(name):
    gen = torch.Generator().manual_seed(7)
    grads = [torch.randn(3, 6, 4, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.3],
             dtype=torch.float64).view(3, 1, 1) for _ in range(8)]
    opts = _STATEFUL_OPTIONS.get(name, {})
    bal = make_balancer(name, 3, **opts)
    for g in grads[:4]:
        bal.combine(g)
    state = copy.deepcopy(bal.state_dict())
    expected = [bal.combine(g) for g in grads[4:]]
    restored = make_balancer(name, 3, **opts)
    restored.load_state_dict(state)
    got = [restored.combine(g) for g in grads[4:]]
    for e, r in zip(expected, got):
        assert torch.equal(e, r)
    assert "step" in state and int(state["step"]) == 4
    assert bal.steps_done == 8 and restored.steps_done == 8
    assert int(restored.state_dict()["step"]) == 8


def test_uncertainty_parameters_are_trainable_and_saved():
    bal = make_balancer("uncertainty", 2)
    params = list(bal.parameters())
    assert len(params) == 1 and params[0].shape == (2,)
    assert "log_vars" in bal.state_dict()


# ---------------------------------------------------------------- bad input
def test_unknown_method_names_key_and_allowed():
    with pytest.raises(ValueError) as err:
        make_balancer("multibalanse", 2)
    msg = str(err.value)
    assert "balance.method" in msg and "'multibalanse'" in msg
    for name in ("multibalance", "cograd", "pcgrad", "nashmtl"):
        assert name in msg


def test_unknown_option_names_option_and_allowed():
    with pytest.raises(ValueError) as err:
        make_balancer("multibalance", 2, betta=0.5)
    msg = str(err.value)
    assert "'betta'" in msg and "beta" in msg and "rho" in msg and "direction" in msg


def test_process_group_is_neither_offered_nor_accepted_as_an_option():
    assert all("process_group" not in method_options(name) for name in available_methods())
    with pytest.raises(ValueError) as err:
        make_balancer("mgda", 2, process_group="x")
    assert "'process_group'" in str(err.value) and "the trainer sets it" in str(err.value)


@pytest.mark.parametrize("name,opts,needle", [
    ("static", {"weights": [1.0, 2.0]}, "expected 3 numbers, got 2"),
    ("cograd", {"weights": [1.0, 2.0, 3.0, 4.0]}, "expected 3 numbers, got 4"),
    ("cograd", {"gamma": [0.1]}, "'gamma'"),
    ("static", {"weights": [1.0, -1.0, 1.0]}, "'weights[1]'"),
    ("multibalance", {"direction": "sideways"}, "'cosine', 'gradient'"),
    ("multibalance", {"gamma": 2.0}, "'gamma'"),
    ("cograd", {"form": "hessian"}, "'fisher', 'algorithm1'"),
    ("pcgrad", {"seed": -1}, "'seed'"),
    ("graddrop", {"leak": 1.5}, "'leak'"),
    ("uncertainty", {"variant": "third"}, "'full', 'half'"),
])
def test_invalid_option_values(name, opts, needle):
    with pytest.raises(ValueError) as err:
        make_balancer(name, 3, **opts)
    assert needle in str(err.value)


def test_invalid_num_tasks():
    with pytest.raises(ValueError, match="num_tasks"):
        make_balancer("equal", 0)


@pytest.mark.parametrize("name", ["equal", "multibalance", "cograd"])
def test_wrong_leading_dim_of_grads(name):
    bal = make_balancer(name, 3)
    with pytest.raises(ValueError) as err:
        bal.combine(torch.randn(2, 4, 5))
    msg = str(err.value)
    assert "[M=3, batch, ...]" in msg and "[2, 4, 5]" in msg
    with pytest.raises(ValueError, match="M=3"):
        bal.combine(torch.randn(3))


def test_wrong_losses_shape():
    bal = make_balancer("uncertainty", 2)
    with pytest.raises(ValueError, match=r"shape \[M=2\]"):
        bal.loss(torch.randn(3))


def test_bad_point_inputs():
    point = BalancePoint(make_balancer("equal", 2))
    with pytest.raises(ValueError, match="batch size"):
        point((torch.randn(3, 2), torch.randn(4, 2)))
    with pytest.raises(ValueError, match="tuple of tensors"):
        point((torch.randn(3, 2), "x"))
    with pytest.raises(ValueError, match="Balancer"):
        BalancePoint(nn.Linear(2, 2))


def test_non_finite_gram_leaves_state_untouched():
    bal = make_balancer("multibalance", 2)
    bal.combine(torch.randn(2, 3, 4))
    before = flat_tensors(copy.deepcopy(bal.state_dict()))
    g = torch.randn(2, 3, 4)
    g[0, 0, 0] = float("nan")
    out = bal.combine(g)
    assert not torch.isfinite(out).all()
    after = flat_tensors(bal.state_dict())
    assert after.keys() == before.keys() and "_extra_state.lambdas" in after
    for k, v in after.items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("name", available_methods())
def test_gradients_in_pieces_equal_the_concatenated_gradient(name):
    """combine((a_m, b_m) per task) == combine(cat(a_m, b_m)) split back, for every method:
    the piece-aware methods skip the concatenation, the others get it done for them."""
    gen = torch.Generator().manual_seed(11)
    opts = _STATEFUL_OPTIONS.get(name, {})
    in_pieces, concatenated = make_balancer(name, 3, **opts), make_balancer(name, 3, **opts)
    scale = torch.tensor([1.0, 3.0, 0.3], dtype=torch.float64).view(3, 1, 1)
    for _ in range(4):
        a = torch.randn(3, 6, 4, generator=gen, dtype=torch.float64) * scale  # [M, B, 4]
        b = torch.randn(3, 6, 2, 5, generator=gen, dtype=torch.float64) * scale.unsqueeze(-1)  # [M, B, 2, 5]
        got = in_pieces.combine([(a[m], b[m]) for m in range(3)])
        flat = concatenated.combine(torch.cat([a, b.reshape(3, 6, 10)], dim=2))
        assert isinstance(got, tuple) and got[0].shape == (6, 4) and got[1].shape == (6, 2, 5)
        torch.testing.assert_close(got[0], flat[:, :4], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got[1], flat[:, 4:].reshape(6, 2, 5), rtol=1e-12, atol=1e-12)
        for key, value in concatenated.stats().items():
            other = in_pieces.stats()[key]
            assert (value is None) == (other is None)
            if value is not None:
                torch.testing.assert_close(other, value, rtol=1e-12, atol=1e-12)


def test_bad_gradient_pieces():
    bal = make_balancer("multibalance", 2)
    a, b = torch.randn(4, 3), torch.randn(4, 2)
    with pytest.raises(ValueError, match="share their shapes"):
        bal.combine([(a, b), (a, a)])  # piece 2 differs between tasks
    with pytest.raises(ValueError, match="share their shapes"):
        bal.combine([(a, b), (a,)])  # task 2 has fewer pieces
    with pytest.raises(ValueError, match="share their shapes"):
        bal.combine([(a, torch.randn(5, 2)), (a, torch.randn(5, 2))])  # two batch sizes
    with pytest.raises(ValueError, match="M=2"):
        bal.combine([(a, b)])
    with pytest.raises(ValueError, match="tuple of them"):
        bal.combine([(a, "b"), (a, b)])


@pytest.mark.parametrize("name", available_methods())
def test_non_finite_gradient_stays_visible(name):
    """A NaN in one task's gradient must reach the combined gradient, where the trainer's
    guard looks for it (a method that masked it away would train on a corrupted step)."""
    bal = make_balancer(name, 3, **_STATEFUL_OPTIONS.get(name, {}))
    g = torch.randn(3, 5, 4)
    g[1, 2, 3] = float("nan")
    assert not torch.isfinite(bal.combine(g)).all()


@pytest.mark.parametrize("name", available_methods())
@pytest.mark.parametrize("m", [2, 3, 5])
def test_degenerate_gradients_give_finite_results(name, m):
    """A task with a zero gradient and two exactly opposite gradients (rank-deficient Gram,
    quadratic forms that round below zero, singular Newton systems) must neither raise nor
    produce a non-finite combined gradient, step after step."""
    gen = torch.Generator().manual_seed(m)
    bal = make_balancer(name, m, **({"weights": [1.0] * m} if name == "static" else {}))
    for _ in range(6):
        g = torch.randn(m, 7, 3, dtype=torch.float64, generator=gen)
        g *= torch.logspace(-2, 1, m, dtype=torch.float64).view(m, 1, 1)
        g[1] = -g[0]
        if m > 2:
            g[2] = 0.0
        out = bal.combine(g)
        assert out.shape == g.shape[1:] and torch.isfinite(out).all()

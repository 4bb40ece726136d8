"""The device path of the balance point: Gram, solve and combination as tensor operations
with no host read. On the CPU it is forced with ``Balancer.path = "device"`` and compared with
the host path; on the `meta` device (tensors without data, which cannot be read at all) a
backward pass that completes proves there is no host read."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from balancing import BalancePoint, available_methods, make_balancer
from balancing.device_linalg import (
    cagrad_dual_tensor,
    min_norm_tensor,
    project_simplex_tensor,
    min_norm_solve,
)
from balancing.gram import combine_stacks, gram_of_stacks, gram_rows, task_stacks
from balancing.methods.cagrad import solve_dual
from balancing.min_norm import min_norm_values
from balancing.simplex import project_simplex_values

#: methods that still read the Gram on the host (and why: README "Balancing on GPU")
HOST_ONLY = {"nashmtl", "pub", "drgrad"}
#: element-wise methods: no solver, only their telemetry Gram is on the device
ELEMENTWISE = {"cograd", "graddrop"}
OPTIONS = {"static": {"weights": [0.5, 2.0, 1.0, 3.0, 0.25]}, "gradvac": {"beta": 0.3}, "dbmtl": {"beta_sigma": 0.5}}
D = torch.float64


def _options(name: str, m: int) -> dict:
    opts = dict(OPTIONS.get(name, {}))
    if "weights" in opts:
        opts["weights"] = opts["weights"][:m]
    return opts


def _device_methods() -> list[str]:
    return [n for n in available_methods() if n not in HOST_ONLY | ELEMENTWISE]


def test_device_path_flags_match_the_documented_sets():
    flagged = {n for n in available_methods() if make_balancer(n, 3).device_path}
    assert flagged == set(_device_methods())
    for must in ("equal", "static", "multibalance", "pcgrad", "gradvac", "mgda", "cagrad", "imtl_g", "dbmtl",
                 "uncertainty"):
        assert must in flagged


def _pieces(m: int, gen: torch.Generator, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    grads = [(torch.randn(6, 3, 4, generator=gen, dtype=D) * (1 + t), torch.randn(6, 5, generator=gen, dtype=D))
             for t in range(m)]
    if step == 2:  # a conflicting pair
        grads[1] = tuple(-0.7 * a + 0.3 * b for a, b in zip(grads[0], grads[1]))
    return grads


@pytest.mark.parametrize("m", [2, 3, 5])
@pytest.mark.parametrize("name", _device_methods())
def test_device_path_equals_host_path(name, m):
    host = make_balancer(name, m, **_options(name, m))
    device = copy.deepcopy(host)
    device.path = "device"
    gen = torch.Generator().manual_seed(7 + m)
    for step in range(6):
        grads = _pieces(m, gen, step)
        out_h, out_d = host.combine(grads), device.combine(grads)
        scale = max(float(p.abs().max()) for task in grads for p in task)
        for a, b in zip(out_h, out_d):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-12 * scale)
        s_h, s_d = host.stats(), device.stats()
        if s_h["weights"] is not None:
            torch.testing.assert_close(s_d["weights"], s_h["weights"], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s_d["cosines"], s_h["cosines"], rtol=1e-12, atol=1e-12)
    state_h, state_d = host.state_dict(), device.state_dict()
    assert state_h.keys() == state_d.keys()
    for key, value in state_h.items():
        other = state_d[key]
        if isinstance(value, dict):  # extra state
            for k in value:
                torch.testing.assert_close(other[k].double(), value[k].double(), rtol=1e-12, atol=1e-12)
        else:
            torch.testing.assert_close(other.double(), value.double(), rtol=1e-12, atol=1e-12)
    assert device.steps_done == host.steps_done == 6


@pytest.mark.parametrize("m", [2, 3])
@pytest.mark.parametrize("name", [n for n in available_methods() if n not in HOST_ONLY | {"graddrop"}])
def test_backward_on_meta_tensors_reads_nothing(name, m):
    """`meta` tensors have no data: any .item()/.tolist()/bool()/copy to the host raises. GradDrop
    is left out only because a random generator cannot be made on `meta`."""
    bal = make_balancer(name, m, **_options(name, m)).to("meta")
    point = BalancePoint(bal)
    trunk = torch.empty(32, 8, device="meta", requires_grad=True)
    experts = torch.empty(32, 4, 6, device="meta", dtype=torch.bfloat16, requires_grad=True)
    copies = point((experts * 2, trunk * 3))
    losses = torch.stack([(c[1] ** 2).mean() + c[0].float().mean() for c in copies])
    bal.loss(losses).backward()
    assert trunk.grad is not None and trunk.grad.device.type == "meta"
    assert experts.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("name", sorted(HOST_ONLY))
def test_host_only_methods_do_read_the_host(name):
    """The meta test can fail: the methods documented as synchronising do read."""
    bal = make_balancer(name, 2).to("meta")
    grads = torch.empty(2, 4, 3, device="meta")
    with pytest.raises((NotImplementedError, RuntimeError)):
        bal.combine(grads)


def test_stacks_are_views_when_the_gradients_share_one_buffer():
    grads = torch.randn(3, 4, 5)
    stacks = task_stacks(list(grads.unbind(0)))
    assert stacks[0].data_ptr() == grads.data_ptr() and stacks[0].shape == (3, 20)
    apart = [torch.randn(4, 5) for _ in range(3)]
    stacked = task_stacks(apart)
    assert stacked[0].data_ptr() != apart[0].data_ptr()
    torch.testing.assert_close(gram_of_stacks(stacks), torch.tensor(gram_rows(list(grads)), dtype=D), rtol=1e-5, atol=1e-5)
    coef = torch.tensor([0.5, -1.0, 2.0], dtype=D)
    torch.testing.assert_close(combine_stacks(coef, stacks, grads[0]), 0.5 * grads[0] - grads[1] + 2 * grads[2])


def test_bf16_gradients_stay_bf16_and_close_to_float64():
    bal = make_balancer("multibalance", 3)
    bal.path = "device"
    ref = make_balancer("multibalance", 3)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        g = torch.randn(3, 64, 16, generator=gen)
        out = bal.combine(g.to(torch.bfloat16))
        exact = ref.combine(g.to(torch.bfloat16).double())
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.double(), exact, rtol=2e-2, atol=2e-2 * float(exact.abs().max()))


def test_non_finite_gradient_on_device_path_keeps_state_and_shows():
    bal = make_balancer("multibalance", 2)
    bal.path = "device"
    g = torch.randn(2, 4, 3, dtype=D)
    bal.combine(g)
    before = bal.lambdas.clone(), bal.ema_norms.clone()
    bad = g.clone()
    bad[1, 0, 0] = float("nan")
    out = bal.combine(bad)
    assert not torch.isfinite(out).all()
    assert torch.equal(bal.lambdas, before[0]) and torch.equal(bal.ema_norms, before[1])
    assert torch.isnan(bal.stats()["weights"]).all()


# ----------------------------------------------------------------- device solvers vs host ones
def _psd(m: int, gen: torch.Generator, degenerate: bool) -> torch.Tensor:
    g = torch.randn(m, 7, generator=gen, dtype=D)
    if degenerate:
        g[1] = -0.5 * g[0]
    return g @ g.T


@pytest.mark.parametrize("m", [2, 3, 4, 6])
def test_min_norm_tensor_matches_host_solver(m):
    gen = torch.Generator().manual_seed(m)
    for trial in range(20):
        k = _psd(m, gen, degenerate=trial % 4 == 0)
        host = torch.tensor(min_norm_values(k.tolist()), dtype=D)
        dev = min_norm_tensor(k)
        assert dev.min() >= 0 and math.isclose(float(dev.sum()), 1.0, abs_tol=1e-12)
        assert float(dev @ k @ dev) <= float(host @ k @ host) + 1e-12 * float(k.diagonal().max())
        if trial % 4:
            torch.testing.assert_close(dev, host, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("m", [2, 3, 5])
@pytest.mark.parametrize("c", [0.1, 0.5, 1.0])
def test_cagrad_dual_tensor_is_at_least_as_good_as_host_solver(m, c):
    gen = torch.Generator().manual_seed(10 * m)
    for trial in range(12):
        k = _psd(m, gen, degenerate=trial % 4 == 0)
        b, r = k.sum(1) / m, c * math.sqrt(max(float(k.sum()) / m**2, 0.0))
        value = lambda w: float(b @ w + r * (w @ k @ w).clamp_min(0).sqrt())  # noqa: E731
        host = torch.tensor(solve_dual(k.tolist(), c), dtype=D)
        dev = cagrad_dual_tensor(k, c)
        assert dev.min() >= 0 and math.isclose(float(dev.sum()), 1.0, abs_tol=1e-12)
        assert value(dev) <= value(host) + 1e-10 * math.sqrt(float(k.diagonal().max()))
        if trial % 4:
            torch.testing.assert_close(dev, host, rtol=1e-6, atol=1e-6)


def test_project_simplex_tensor_matches_host():
    gen = torch.Generator().manual_seed(0)
    for m in (1, 2, 3, 7):
        for _ in range(20):
            v = torch.randn(m, generator=gen, dtype=D) * 3
            torch.testing.assert_close(project_simplex_tensor(v), torch.tensor(project_simplex_values(v.tolist()), dtype=D),
                                       rtol=0, atol=1e-15)


def test_min_norm_solve_regular_and_singular():
    a = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=D)
    b = torch.tensor([1.0, 2.0], dtype=D)
    torch.testing.assert_close(min_norm_solve(a, b), torch.linalg.solve(a, b), rtol=1e-12, atol=1e-12)
    singular = torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=D)
    rhs = torch.tensor([1.0, 1.0], dtype=D)
    expected = np.linalg.pinv(singular.numpy()) @ rhs.numpy()
    torch.testing.assert_close(min_norm_solve(singular, rhs), torch.from_numpy(expected), rtol=1e-7, atol=1e-9)
    gen = torch.Generator().manual_seed(0)
    for n in (3, 4, 5):  # rank n - 1
        low = torch.randn(n, n - 1, generator=gen, dtype=D) @ torch.randn(n - 1, n, generator=gen, dtype=D)
        rhs = torch.randn(n, generator=gen, dtype=D)
        expected = torch.from_numpy(np.linalg.pinv(low.numpy()) @ rhs.numpy())
        torch.testing.assert_close(min_norm_solve(low, rhs), expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))

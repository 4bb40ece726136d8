"""Two-process gloo run: every Gram-first method gives identical weights on both ranks, equal
to one process holding the concatenated batch, and each rank's combined gradient equals its
rows of the single-process combined gradient. One spawn for all methods."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from balancing import make_balancer
from tests.state_util import flat_tensors

WORLD, M, B, K, STEPS = 2, 3, 8, 5, 5
#: float32 gradients: each rank's local Gram is accumulated in float32 (~1e-7 relative), so the
#: reduced Gram equals the one-process Gram to float32 rounding (an inner product is off by
#: ~1e-7 |g_i| |g_j|, hence the absolute term for small coefficients); the ranks agree bitwise.
GRAM_TOL = {"rtol": 2e-6, "atol": 1e-6}

CASES = {
    "equal": ("equal", {}),
    "static": ("static", {"weights": [0.5, 1.0, 2.0]}),
    "multibalance_cosine": ("multibalance", {"gamma": 0.3}),
    "multibalance_gradient": ("multibalance", {"direction": "gradient", "beta": 0.05, "gamma": 0.3}),
    "multibalance_no_ema": ("multibalance", {"ema": False}),
    "mgda": ("mgda", {}),
    "cagrad": ("cagrad", {}),
    "imtl_g": ("imtl_g", {}),
    "nashmtl": ("nashmtl", {}),
    "gradvac": ("gradvac", {"beta": 0.3, "seed": 4}),
    "dbmtl": ("dbmtl", {"beta_sigma": 0.5}),
    "pcgrad": ("pcgrad", {"seed": 2}),
    "cograd": ("cograd", {"gamma": [0.2, 0.1, 0.3]}),
}
#: the device path (Gram, all-reduce, solve and combination as tensors), forced on the CPU
DEVICE_CASES = ("multibalance_cosine", "mgda", "cagrad", "imtl_g", "gradvac", "dbmtl", "pcgrad", "static")
CASES.update({f"{key}@device": CASES[key] for key in DEVICE_CASES})


def make_grads() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    scales = torch.tensor([1.0, 3.0, 0.3]).view(M, 1, 1)
    out = []
    for _ in range(STEPS):
        g = torch.randn(M, B, K, generator=gen) * scales
        g[1] = -0.5 * g[0] + g[1]
        out.append(g)
    return out


def run_cases(rows: slice) -> dict:
    """Run every case on the given rows of the fixed batches."""
    results = {}
    for key, (name, opts) in CASES.items():
        bal = make_balancer(name, M, **opts)
        bal.path = "device" if key.endswith("@device") else "auto"
        combined, weights, extra = [], [], []
        for g in make_grads():
            combined.append(bal.combine(g[:, rows].contiguous()))
            weights.append(bal.stats()["weights"])
            extra.append(getattr(bal, "last_mixing", None))
        results[key] = {"combined": combined, "weights": weights, "mixing": extra,
                        "norms": bal.stats()["grad_norms"], "state": bal.state_dict()}
    # dbmtl's loss: local partial losses -> gradient of log(global loss)
    bal = make_balancer("dbmtl", M)
    full = torch.tensor([0.6, 1.5, 0.2], dtype=torch.float64)
    part = torch.tensor([0.25, 1.0, 0.05], dtype=torch.float64)
    local = (part if rows.start == 0 else full - part).clone().requires_grad_(True)
    if rows == slice(None):
        local = full.clone().requires_grad_(True)
    total = bal.loss(local)
    total.backward()
    results["dbmtl_loss"] = {"value": total.detach(), "grad": local.grad}
    return results


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        half = B // WORLD
        res = run_cases(slice(rank * half, (rank + 1) * half))
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results():
    os.environ["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(init_file, tmp), nprocs=WORLD, join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    single = run_cases(slice(None))
    return ranks, single


@pytest.mark.parametrize("key", list(CASES))
def test_ranks_agree_with_single_process(distributed_results, key):
    ranks, single = distributed_results
    half = B // WORLD
    r0, r1, ref = ranks[0][key], ranks[1][key], single[key]
    for step in range(STEPS):
        w0, w1, wref = r0["weights"][step], r1["weights"][step], ref["weights"][step]
        assert torch.equal(w0, w1), f"{key}: ranks disagree at step {step}"
        torch.testing.assert_close(w0, wref, **GRAM_TOL)
        if r0["mixing"][step] is not None:
            assert torch.equal(r0["mixing"][step], r1["mixing"][step])
            torch.testing.assert_close(r0["mixing"][step], ref["mixing"][step], **GRAM_TOL)
        for r, res in enumerate((r0, r1)):
            rows = ref["combined"][step][r * half:(r + 1) * half]
            torch.testing.assert_close(res["combined"][step], rows, rtol=1e-5, atol=1e-6)
    assert torch.equal(r0["norms"], r1["norms"])
    torch.testing.assert_close(r0["norms"], ref["norms"], **GRAM_TOL)
    states = [flat_tensors(res["state"]) for res in (r0, r1, ref)]
    assert states[0].keys() == states[1].keys() == states[2].keys()
    for name, value in states[2].items():
        assert torch.equal(states[0][name], states[1][name])
        torch.testing.assert_close(states[0][name], value, **GRAM_TOL)


def test_dbmtl_loss_uses_global_losses(distributed_results):
    ranks, single = distributed_results
    for r in range(WORLD):
        torch.testing.assert_close(ranks[r]["dbmtl_loss"]["value"], single["dbmtl_loss"]["value"])
        torch.testing.assert_close(ranks[r]["dbmtl_loss"]["grad"], single["dbmtl_loss"]["grad"])

"""GAUC by user on 2 ranks (users' rows spread over both) against a brute-force per-user AUC."""
from __future__ import annotations

import numpy as np
import torch

from tests.distributed_util import run_ranks

N, USERS = 400, 23


def rows(seed: int = 0):
    rng = np.random.default_rng(seed)
    users = rng.integers(0, USERS, N)
    labels = (rng.random((2, N)) < 0.4).astype(np.float32)
    preds = np.clip(labels * 0.3 + rng.random((2, N)) * 0.7, 0, 1).astype(np.float32)
    weights = np.ones(N, dtype=np.float32)
    weights[-7:] = 0  # padding rows must not count
    return users, preds, labels, weights


def brute_force_gauc(users, preds, labels, weights) -> list[float]:
    out = []
    for t in range(preds.shape[0]):
        aucs = []
        for u in np.unique(users[weights > 0]):
            mask = (users == u) & (weights > 0)
            pos, neg = preds[t, mask & (labels[t] == 1)], preds[t, mask & (labels[t] == 0)]
            if len(pos) and len(neg):
                wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
                aucs.append(wins / (len(pos) * len(neg)))
        out.append(float(np.mean(aucs)))
    return out


def rank_gauc(_: int) -> dict[str, float]:
    from trainer.run.distributed import init_distributed, shutdown_distributed
    from trainer.observe.gauc import UserGAUC

    env = init_distributed()
    users, preds, labels, weights = rows()
    half = slice(env.rank * N // 2, (env.rank + 1) * N // 2)  # each rank sees half the rows
    gauc = UserGAUC(["a", "b"], env.rank, env.world_size)
    for chunk in np.array_split(np.arange(N)[half], 3):  # several eval batches
        gauc.update(torch.from_numpy(users[chunk]), torch.from_numpy(preds[:, chunk]),
                    torch.from_numpy(labels[:, chunk]), torch.from_numpy(weights[chunk]))
    result = gauc.compute()
    shutdown_distributed()
    return result


def test_gauc_two_ranks_matches_brute_force():
    expected = brute_force_gauc(*rows())
    got = run_ranks(rank_gauc, 2, 0)
    assert got[0] == got[1]
    assert np.allclose([got[0]["a"], got[0]["b"]], expected, atol=1e-6), (got[0], expected)

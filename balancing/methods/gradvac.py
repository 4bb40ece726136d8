"""`gradvac`: Gradient Vaccine (Wang et al., ICLR 2021).

For each task i, over the other tasks j in random order, with phi = cos(g̃_i, g_j) and the
EMA target phî_ij: if phi < phî_ij,
  g̃_i <- g̃_i + ||g̃_i|| (phî sqrt(1-phi²) - phi sqrt(1-phî²)) / (||g_j|| sqrt(1-phî²)) g_j;
then phî_ij <- (1 - beta) phî_ij + beta phi (targets start at 0). combined = sum_i g̃_i.
As in `pcgrad`, g̃_i = sum_k A_ik g_k and all dot products come from the reduced Gram, so the
combined gradient is (1ᵀA) applied to the LOCAL gradients; ``stats()["weights"]`` = 1ᵀA.
The paper applies this per parameter group; here the whole representation is one group.
Options: beta=0.01, seed=0.
"""
from __future__ import annotations

from typing import Any, List, Optional

import torch

from ..gram import GramRows
from ..options import check_float
from ..registry import register
from ..small_linalg import quad
from .pcgrad import MixingBalancer

_EPS = 1e-12


@register("gradvac")
class GradVac(MixingBalancer):
    """GradVac as a Gram-derived mixing matrix; state: ``targets`` phî [M, M]."""

    def __init__(
        self,
        num_tasks: int,
        beta: float = 0.01,
        seed: int = 0,
        process_group: Optional[Any] = None,
    ) -> None:
        super().__init__(num_tasks, seed, process_group)
        self.beta = check_float("beta", beta, low=0.0, high=1.0)
        self.register_buffer("targets", torch.zeros(num_tasks, num_tasks, dtype=torch.float64))

    def mixing(self, gram: GramRows) -> List[List[float]]:
        m = self.num_tasks
        targets = self.targets.tolist()
        mix = [[1.0 if i == j else 0.0 for j in range(m)] for i in range(m)]
        for i, order in enumerate(self._orders()):
            row = mix[i]
            for j in order:
                n_i = max(quad(gram, row), 0.0) ** 0.5
                n_j = max(gram[j][j], 0.0) ** 0.5
                if n_i <= 0 or n_j <= 0:
                    continue
                phi = sum(row[t] * gram[t][j] for t in range(m)) / (n_i * n_j)
                target = targets[i][j]
                if phi < target:
                    root_t = max(1.0 - target * target, _EPS) ** 0.5
                    root_p = max(1.0 - phi * phi, 0.0) ** 0.5
                    row[j] += n_i * (target * root_p - phi * root_t) / (n_j * root_t)
                targets[i][j] = (1 - self.beta) * target + self.beta * phi
        self.targets.copy_(torch.tensor(targets, dtype=torch.float64))
        return mix

    def mixing_tensor(self, gram: torch.Tensor, orders: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
        (targets,) = self._buffers_on(gram.device, "targets")
        rows = torch.arange(self.num_tasks, device=gram.device)
        mix = torch.eye(self.num_tasks, dtype=gram.dtype, device=gram.device)
        new_targets = targets.clone()
        for k in range(self.num_tasks - 1):
            j = orders[:, k]
            mk = mix @ gram
            n_i = (mk * mix).sum(dim=1).clamp_min(0.0).sqrt()
            n_j = gram[j, j].clamp_min(0.0).sqrt()
            valid = (n_i > 0) & (n_j > 0)
            phi = mk[rows, j] / torch.where(valid, n_i * n_j, 1.0)
            target = new_targets[rows, j]
            root_t = (1.0 - target * target).clamp_min(_EPS).sqrt()
            root_p = (1.0 - phi * phi).clamp_min(0.0).sqrt()
            step = n_i * (target * root_p - phi * root_t) / (torch.where(valid, n_j, 1.0) * root_t)
            mix = mix.index_put((rows, j), torch.where(valid & (phi < target), step, 0.0), accumulate=True)
            new_targets[rows, j] = torch.where(valid, (1 - self.beta) * target + self.beta * phi, target)
        targets.copy_(torch.where(finite, new_targets, targets))
        return mix

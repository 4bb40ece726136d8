"""GAUC by user on the evaluation split: the mean over users of each user's AUC (users with
both classes), computed by TorchRec's GAUCMetric. A user's rows may sit on any rank, so
they are first routed to rank (user id mod world size) with one all-to-all; then each rank
holds whole users and TorchRec reduces the per-user sums across ranks."""
from __future__ import annotations

import torch
import torch.distributed as dist

from balancing.distributed import is_distributed
from torchrec.metrics.gauc import GAUCMetric
from torchrec.metrics.metrics_config import RecTaskInfo


def _route_by_user(users: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Send every row to rank (user mod world size); returns this rank's users and rows."""
    if not is_distributed():
        return users, rows
    world = dist.get_world_size()
    dest = torch.remainder(users, world)
    order = torch.argsort(dest, stable=True)
    users, rows, dest = users[order], rows[order], dest[order]
    send_counts = torch.bincount(dest, minlength=world)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts)
    send, recv = send_counts.tolist(), recv_counts.tolist()
    out_users = users.new_empty(sum(recv))
    dist.all_to_all_single(out_users, users, recv, send)
    out_rows = rows.new_empty(sum(recv), rows.shape[1])
    dist.all_to_all_single(out_rows, rows.contiguous(), recv, send)
    return out_users, out_rows


class UserGAUC:
    """Collects (user, predictions, labels, weight) during evaluation; `compute` is collective."""

    def __init__(self, tasks: list[str], rank: int, world_size: int) -> None:
        self.tasks, self.rank, self.world_size = tasks, rank, world_size
        self.users: list[torch.Tensor] = []
        self.rows: list[torch.Tensor] = []

    @torch.no_grad()
    def update(self, users: torch.Tensor, predictions: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> None:
        keep = weights > 0  # padding rows belong to no user
        self.users.append(users[keep].long())
        self.rows.append(torch.cat([predictions.T[keep], labels.T[keep], weights[keep, None]], dim=1).double())

    def compute(self) -> dict[str, float]:
        m = len(self.tasks)
        users = torch.cat(self.users) if self.users else torch.empty(0, dtype=torch.long)
        rows = torch.cat(self.rows) if self.rows else torch.empty(0, 2 * m + 1, dtype=torch.double)
        users, rows = _route_by_user(users, rows)
        order = torch.argsort(users, stable=True)
        users, rows = users[order], rows[order]
        _, counts = torch.unique_consecutive(users, return_counts=True)
        infos = [RecTaskInfo(name=t, label_name=t, prediction_name=t, weight_name=t) for t in self.tasks]
        metric = GAUCMetric(
            world_size=self.world_size, my_rank=self.rank, batch_size=max(1, rows.shape[0]), tasks=infos,
            window_size=max(1, rows.shape[0]) * self.world_size, compute_on_all_ranks=True,
        )
        if rows.shape[0]:
            metric.update(
                predictions={t: rows[:, i].float() for i, t in enumerate(self.tasks)},
                labels={t: rows[:, m + i].float() for i, t in enumerate(self.tasks)},
                weights={t: rows[:, 2 * m].float() for t in self.tasks},
                num_candidates=counts,
            )
        raw = metric.compute()
        return {t: float(raw[f"gauc-{t}|lifetime_gauc"].reshape(-1)[0]) for t in self.tasks}

"""`mgda`: MGDA-UB (Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization",
NeurIPS 2018) at the shared representation.

Weights a = argmin_{a in simplex} ||sum_m a_m g_m||² (the exact min-norm point of the
convex hull of the representation gradients, from the reduced Gram by
`balancing.min_norm.min_norm_weights`); combined = sum_m a_m g_m. The weights sum to 1, so
the combined gradient is on the scale of ONE task's gradient (paper convention), not of
the sum. On the device it enumerates the simplex's faces (exact; up to 10 tasks, above that
the host solver runs, which reads the Gram). No options besides ``process_group``.
"""
from __future__ import annotations

from typing import Any, List, Optional

import torch

from ..base import GramBalancer
from ..device_linalg import MAX_FACE_TASKS, min_norm_tensor
from ..gram import GramRows
from ..min_norm import min_norm_values
from ..registry import register


@register("mgda")
class MGDA(GramBalancer):
    """MGDA-UB min-norm weights (see module docstring)."""

    def __init__(self, num_tasks: int, process_group: Optional[Any] = None) -> None:
        super().__init__(num_tasks, process_group)
        self.device_path = num_tasks <= MAX_FACE_TASKS

    def coefficient_values(self, gram: GramRows) -> List[float]:
        return min_norm_values(gram)

    def coefficient_tensor(self, gram: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
        return min_norm_tensor(gram)

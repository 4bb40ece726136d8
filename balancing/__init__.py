"""recbalance gradient balancing: one autograd node at the shared representation combines
the per-task gradients inside a single ordinary backward pass (pure torch).

    bal = make_balancer("multibalance", num_tasks=2)
    point = BalancePoint(bal)
    h1, h2 = point(shared)
    total = bal.loss(torch.stack([loss1, loss2]))
    total.backward()
"""
from . import methods as _methods  # noqa: F401  (registers the methods)
from .methods import pub as _pub  # noqa: F401  (registers "pub")
from .methods.drgrad import DRGrad, DRGradPoint
from .base import Balancer, GramBalancer, TaskInfo
from .min_norm import min_norm_weights
from .nash import nash_bargaining_weights
from .point import BalancePoint
from .registry import available_methods, make_balancer, method_options
from .simplex import project_simplex

__all__ = [
    "BalancePoint",
    "Balancer",
    "DRGrad",
    "DRGradPoint",
    "GramBalancer",
    "TaskInfo",
    "available_methods",
    "make_balancer",
    "method_options",
    "min_norm_weights",
    "nash_bargaining_weights",
    "project_simplex",
]

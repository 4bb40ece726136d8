"""Flatten a (nested) state dict to name -> tensor, for comparing balancer states."""
from __future__ import annotations

from typing import Any

import torch


def flat_tensors(state: dict[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of ``state`` (nested dicts such as a module's ``_extra_state`` included)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out.update(flat_tensors(value, f"{prefix}{key}."))
        elif isinstance(value, torch.Tensor):
            out[f"{prefix}{key}"] = value
    return out

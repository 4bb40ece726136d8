"""Deterministic per-step random generators (same on every rank, reproducible after a reload)."""
from __future__ import annotations

from typing import Any, Dict

import torch

from .options import check_int

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, step, salt) over 63 bits


def step_generator(seed: int, step: int, device: torch.device | str = "cpu", salt: int = 0) -> torch.Generator:
    """A generator seeded from ``(seed, step, salt)`` only, so ranks and reloads agree."""
    value = (int(seed) * _MIX + int(step) * 1_000_003 + int(salt) * 7919) % (2**63 - 1)
    gen = torch.Generator(device=device)
    gen.manual_seed(value)
    return gen


class SeededState:
    """Mixin for balancers with a ``seed`` option: the seed is a buffer (so it is in
    ``state_dict()``) and a Python int read once (reading a device buffer in the backward
    pass would wait for the GPU)."""

    def _init_seed(self, seed: object) -> None:
        self.register_buffer("seed", torch.tensor(check_int("seed", seed, low=0), dtype=torch.long))  # type: ignore[attr-defined]
        self._seed = int(self.seed)  # type: ignore[attr-defined]

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[misc]
        self._seed = int(self.seed)  # type: ignore[attr-defined]

"""Deterministic per-step random generators (same on every rank, reproducible after a reload)."""
from __future__ import annotations

import torch

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, step, salt) over 63 bits


def step_generator(seed: int, step: int, device: torch.device | str = "cpu", salt: int = 0) -> torch.Generator:
    """A generator seeded from ``(seed, step, salt)`` only, so ranks and reloads agree."""
    value = (int(seed) * _MIX + int(step) * 1_000_003 + int(salt) * 7919) % (2**63 - 1)
    gen = torch.Generator(device=device)
    gen.manual_seed(value)
    return gen

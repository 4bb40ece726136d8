"""Shared fixtures: small data sets written once per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
# A rank whose peer died fails after this long instead of hanging the suite.
os.environ.setdefault("RECBALANCE_COLLECTIVE_TIMEOUT_S", "120")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~3k rows of synthetic click/conversion data in row groups of 256 rows."""
    from trainer.datasets.synthetic import make_synthetic

    out = tmp_path_factory.mktemp("tiny") / "synthetic"
    make_synthetic(out, rows=3000, num_tasks=2, relation=0.5, seed=1, num_users=50, num_items=200,
                   num_categories=10, row_group_size=256)
    return out

"""TaskMetrics on known numbers: NE, log loss and calibration against hand computation."""
from __future__ import annotations

import math

import pytest
import torch

from trainer.observe.metrics import TaskMetrics


def test_calibration_ne_and_loss_by_hand():
    tasks = ["click", "conversion"]
    logits = torch.tensor([[0.0, -2.0], [1.0, -1.0], [-1.0, 0.5], [2.0, -3.0]])
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    metrics = TaskMetrics(tasks, rank=0, world_size=1, local_batch_size=4, ne_window_examples=100, calibration=True)
    training = TaskMetrics(tasks, rank=0, world_size=1, local_batch_size=4, ne_window_examples=100)
    for m in (metrics, training):
        m.update(logits.T, labels.T, torch.ones(4))  # task-major, as the trainer passes them
    out = metrics.compute()
    assert "calibration" not in training.compute()["click"]  # training progress does not compute it
    p = torch.sigmoid(logits.double())
    for m, task in enumerate(tasks):
        y = labels[:, m].double()
        assert out[task]["calibration"] == pytest.approx(float(p[:, m].sum() / y.sum()), rel=1e-6)
        loss = float(-(y * p[:, m].log() + (1 - y) * (1 - p[:, m]).log()).mean())
        rate = float(y.mean())
        entropy = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
        assert out[task]["loss"] == pytest.approx(loss, rel=1e-5)
        assert out[task]["ne"] == pytest.approx(loss / entropy, rel=1e-5)

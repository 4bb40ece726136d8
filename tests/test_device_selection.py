"""`train.device`: the CUDA code path is selected by the config and refused, naming the key,
where no GPU is usable; on this CPU machine "auto" trains on the CPU with gloo. (The CUDA
path itself runs only where a GPU is: README "Training on GPU" says what was measured.)"""
from __future__ import annotations

import pytest
import torch

from trainer.config import ConfigError, load_config
from trainer.run.distributed import process_group_backend, resolve_device
from trainer.core.guard import NonFiniteGuard
from trainer.observe.metrics import gpu_memory

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")


def test_device_key_values():
    assert load_config(None, ["train.device=cuda"]).train.device == "cuda"
    assert load_config(None).train.device == "auto"
    with pytest.raises(ConfigError, match="config key 'train.device': 'tpu' is not allowed; expected one of 'auto', 'cpu', 'cuda'"):
        load_config(None, ["train.device=tpu"])


@needs_no_gpu
def test_cuda_without_a_gpu_is_refused_before_launch():
    assert resolve_device("auto") == "cpu"
    assert resolve_device("cpu", 4) == "cpu"
    with pytest.raises(ConfigError, match=r"config key 'train.device': 'cuda' needs one GPU per local rank \(2\)"):
        resolve_device("cuda", 2)


def test_backends_per_device():
    assert process_group_backend("cuda") == "cpu:gloo,cuda:nccl"  # CPU flags and counters keep gloo
    assert process_group_backend("cpu") == "gloo"


def test_gpu_memory_only_on_cuda():
    assert gpu_memory(torch.device("cpu")) is None


def test_guard_reads_its_flag_once_after_the_backward():
    """CPU: zeroes a non-finite embedding gradient; the flag and the dense gradients in one read."""
    emb = torch.nn.Linear(3, 4)
    guard = NonFiniteGuard(emb)
    dense = torch.nn.Linear(4, 1)
    for poison, expected in ((False, True), (True, False)):
        guard.begin_step()
        emb.zero_grad()
        out = emb(torch.ones(2, 3))
        y = dense(out * (float("nan") if poison else 1.0)).sum()
        y.backward()
        assert guard.tripped is poison
        assert guard.step_is_finite(list(dense.parameters())) is expected
        assert torch.isfinite(emb.weight.grad).all()  # zeroed, never NaN, when tripped

"""PLE (progressive layered extraction) as a task side: its balance point sits on everything
the last layer's task-specific gates read, so with `equal` it trains exactly like the model
without a node, and each task-specific part receives gradients from its own task only."""
from __future__ import annotations

import copy

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from balancing import make_balancer
from models.config import ModelConfig
from models.heads import PLEHeads
from models.ranker import MultiTaskRanker

TASKS, B = 3, 12


def _model(layers: int, method: str = "equal") -> MultiTaskRanker:
    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name="t_a", embedding_dim=4, num_embeddings=10, feature_names=["a"])]
    spec = ModelConfig(kind="ple", dense_layers=[6], cross_layers=1, cross_rank=2, shared_layers=[8],
                       num_experts=2, task_experts=2, ple_layers=layers, expert_layers=[5], tower_layers=[3])
    return MultiTaskRanker(tables, num_dense=3, num_tasks=TASKS, spec=spec, balancer=make_balancer(method, TASKS))


def _batch():
    gen = torch.Generator().manual_seed(1)
    dense = torch.randn(B, 3, generator=gen)
    sparse = KeyedJaggedTensor.from_lengths_sync(keys=["a"], values=torch.randint(0, 10, (B,), generator=gen),
                                                 lengths=torch.ones(B, dtype=torch.int32))
    labels = (torch.rand(TASKS, B, generator=gen) < 0.5).float()
    return dense, sparse, labels


def _losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(dim=1)


@pytest.mark.parametrize("layers", [1, 2])
def test_equal_point_gives_the_gradients_of_the_summed_loss(layers):
    model = _model(layers)
    plain = copy.deepcopy(model)
    dense, sparse, labels = _batch()
    model.balancer.loss(_losses(model(dense, sparse), labels)).backward()
    shared = plain.shared(dense, sparse)  # no node: every task reads the same tensors
    _losses(plain.task_logits(tuple(shared for _ in range(TASKS))), labels).sum().backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


@pytest.mark.parametrize("layers", [1, 2])
def test_task_parts_hear_only_their_task_and_upstream_is_shared(layers):
    model = _model(layers)
    heads: PLEHeads = model.heads
    upstream = {id(p) for p in heads.upstream_parameters()}
    last = heads.layers[-1]
    own = {m: {id(p) for part in (last.task_experts[m], last.task_gates[m], heads.towers[m]) for p in part.parameters()}
           for m in range(TASKS)}
    assert upstream | set().union(*own.values()) == {id(p) for p in heads.parameters()}
    assert not upstream & set().union(*own.values())
    dense, sparse, labels = _batch()
    for m in range(TASKS):
        model.zero_grad()
        _losses(model(dense, sparse), labels)[m].backward()
        for k in range(TASKS):
            touched = any(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.parameters() if id(p) in own[k])
            assert touched is (k == m), f"task {k}'s parts after task {m}'s loss"
    shared_ids = {id(p) for p in model.shared_dense_parameters()}
    assert upstream <= shared_ids


def test_shared_tensors_of_one_and_two_layers():
    one, two = _model(1), _model(2)
    dense, sparse, _ = _batch()
    assert len(one.shared(dense, sparse)) == 2            # shared experts' outputs, the interaction output
    assert len(two.shared(dense, sparse)) == 1 + TASKS    # shared experts' outputs, one input per task
    assert one(dense, sparse).shape == (TASKS, B)

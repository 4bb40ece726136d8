"""The shared bottom of a ranking model, as small named parts: sparse features through
embedding tables, dense features through an MLP, and a DCNv2 interaction on top."""
from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.crossnet import LowRankCrossNet
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.mlp import MLP
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


class SparseArch(nn.Module):
    """Pools each sparse feature through its own table; the tables are what TorchRec shards."""

    def __init__(self, tables: list[EmbeddingBagConfig], device: torch.device | None = None) -> None:
        super().__init__()
        self.embedding_bag_collection = EmbeddingBagCollection(tables=tables, device=device)
        self.feature_names = [name for table in tables for name in table.feature_names]
        self.out_features = sum(t.embedding_dim * len(t.feature_names) for t in tables)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        # A sharded collection may emit features in its own order: read them by name.
        pooled = self.embedding_bag_collection(features).to_dict()
        return torch.cat([pooled[name] for name in self.feature_names], dim=1)


class DenseArch(nn.Module):
    """An MLP over the dense (numeric) features."""

    def __init__(self, in_features: int, layer_sizes: list[int]) -> None:
        super().__init__()
        self.out_features = layer_sizes[-1] if in_features > 0 else 0
        self.mlp = MLP(in_features, layer_sizes) if in_features > 0 else None

    def forward(self, dense: torch.Tensor) -> torch.Tensor:
        if self.mlp is None:
            return dense.new_zeros(dense.shape[0], 0)
        return self.mlp(dense)


class InteractionDCNArch(nn.Module):
    """DCNv2 low-rank cross layers over [dense, sparse], then a shared MLP: the representation
    every task reads."""

    def __init__(self, in_features: int, cross_layers: int, cross_rank: int, layer_sizes: list[int]) -> None:
        super().__init__()
        self.crossnet = (
            LowRankCrossNet(in_features=in_features, num_layers=cross_layers, low_rank=cross_rank)
            if cross_layers > 0
            else nn.Identity()
        )
        self.mlp = MLP(in_features, layer_sizes)
        self.out_features = layer_sizes[-1]

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.crossnet(torch.cat([dense, sparse], dim=1)))

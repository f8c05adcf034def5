"""The retrieval network: backbone -> pooling -> linear embedding -> L2 normalisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from retrieval.config import ModelSpec
from retrieval.models.backbones import build_backbone
from retrieval.models.pooling import build_pooling


class EmbeddingNetwork(nn.Module):
    """Maps images `[B, 3, H, W]` to L2-normalised embeddings `[B, D]`.

    Args:
        backbone: torchvision model name.
        weights: torchvision weights name, or None for random initialisation.
        pooling: `gem`, `avg` or `max`.
        gem_p: initial GeM exponent.
        embedding_dim: D.
    """

    def __init__(
        self,
        *,
        backbone: str,
        weights: str | None,
        pooling: str,
        gem_p: float,
        embedding_dim: int,
    ) -> None:
        super().__init__()
        self.trunk, channels = build_backbone(name=backbone, weights=weights)
        self.pool = build_pooling(name=pooling, gem_p=gem_p)
        self.head = nn.Linear(channels, embedding_dim)
        self.embedding_dim = embedding_dim

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> EmbeddingNetwork:
        return cls(
            backbone=spec.backbone,
            weights=spec.weights,
            pooling=spec.pooling,
            gem_p=spec.gem_p,
            embedding_dim=spec.embedding_dim,
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` -> `[B, D]`, unit norm."""
        return F.normalize(self.head(self.pool(self.trunk(images))), dim=-1)

"""Backbones, pooling layers and embedding heads."""

from retrieval.models.backbones import build_backbone
from retrieval.models.embedding import EmbeddingNetwork
from retrieval.models.pooling import GeM, build_pooling

__all__ = ["EmbeddingNetwork", "GeM", "build_backbone", "build_pooling"]

"""The network of incremental retrieval: an embedding network plus a classifier that grows.

Retrieval uses the L2-normalised embedding only; the classifier (a cosine classifier over
the classes seen so far) gives the cross-entropy on new classes and the old classes'
probabilities that knowledge distillation needs. Each task appends rows for its classes;
the rows of earlier classes are kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from retrieval.config import ModelSpec
from retrieval.models.embedding import EmbeddingNetwork

CLASSIFIER_WEIGHT = "classifier.weight"


class CosineClassifier(nn.Module):
    """`logits = cos(f, w_c) / temperature` for every class c; rows can be appended.

    Args:
        dim: embedding size D.
        num_classes: initial number of classes C (rows of the weight `[C, D]`).
        temperature: divides the cosines (0.05 gives logits in [-20, 20]).
    """

    def __init__(self, *, dim: int, num_classes: int, temperature: float) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"a classifier needs at least one class, got {num_classes}")
        self.weight = nn.Parameter(torch.randn(num_classes, dim) * 0.01)
        self.temperature = temperature

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    def grow(self, num_classes: int) -> None:
        """Append rows up to `num_classes` (new rows random, old rows unchanged); never shrinks."""
        if num_classes < self.num_classes:
            raise ValueError(f"a classifier of {self.num_classes} classes cannot shrink to {num_classes}")
        if num_classes == self.num_classes:
            return
        extra = torch.randn(num_classes - self.num_classes, self.weight.shape[1], device=self.weight.device) * 0.01
        self.weight = nn.Parameter(torch.cat([self.weight.detach(), extra.to(self.weight.dtype)]))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """`[B, D]` -> logits `[B, C]`."""
        return F.normalize(embeddings, dim=-1) @ F.normalize(self.weight, dim=-1).T / self.temperature


class IncrementalNetwork(nn.Module):
    """Embedding network + growing cosine classifier; `forward` returns both.

    Args:
        model: the embedding network's spec (`embedding_dim` must be set).
        num_classes: classes the classifier starts with.
        temperature: the cosine classifier's temperature.
    """

    def __init__(self, *, model: ModelSpec, num_classes: int, temperature: float) -> None:
        super().__init__()
        self.embedding = EmbeddingNetwork.from_spec(model)
        self.classifier = CosineClassifier(
            dim=self.embedding.embedding_dim, num_classes=num_classes, temperature=temperature
        )

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[B, 3, H, W]` -> (embeddings `[B, D]` unit norm, logits `[B, C]`)."""
        embeddings = self.embedding(images)
        return embeddings, self.classifier(embeddings)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Loads a state of any task: the classifier first grows to the saved number of classes."""
        saved = state_dict.get(CLASSIFIER_WEIGHT)
        if saved is not None and saved.shape[0] > self.classifier.num_classes:
            self.classifier.grow(int(saved.shape[0]))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

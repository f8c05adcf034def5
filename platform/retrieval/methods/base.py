"""What every retrieval method provides to the training driver and to serving."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from retrieval.config import JobSpec


class RetrievalMethod(ABC):
    """A thesis method: its model, one training step, and how it embeds for retrieval.

    A method holds no training state of its own (the driver owns the model, optimiser and
    checkpoints), so the same method runs unchanged in a plain process, on one CPU, or in
    every worker of a Ray Train job.

    Args:
        spec: the validated job spec.
    """

    name: str

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A fresh model with the spec's architecture (backbone weights per the spec)."""

    @abstractmethod
    def build_loss(self) -> nn.Module:
        """The loss module; called once per worker, moved to the device by the driver."""

    @abstractmethod
    def training_step(
        self, *, model: nn.Module, loss: nn.Module, images: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Loss terms of one batch; `"loss"` is the weighted total to back-propagate.

        Args:
            model: the (possibly DDP-wrapped) model.
            loss: what `build_loss` returned.
            images: `[B, 3, H, W]`.
            labels: `[B]`.
        """

    @abstractmethod
    def embed(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Retrieval embeddings `[B, D]` (L2-normalised) of images `[B, 3, H, W]`."""

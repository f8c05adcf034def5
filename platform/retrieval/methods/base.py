"""What every retrieval method provides to the training driver and to serving."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from retrieval.config import JobSpec

if TYPE_CHECKING:
    from retrieval.data.base import ImageDataset


class RetrievalMethod(ABC):
    """A thesis method: its model, one training step, and how it embeds for retrieval.

    A method holds no training state of its own (the driver owns the model, optimiser and
    checkpoints), so the same method runs unchanged in a plain process, on one CPU, or in
    every worker of a Ray Train job. The one exception is what `prepare_training` derives
    from the training data before the first step (e.g. mined pseudo-labels), which a method
    may keep and look up per batch by dataset index in `indexed_training_step`.

    The driver calls, per worker: `build_model`, `prepare_training` (on the fresh model, before
    it is wrapped for DDP, before the optimiser exists and before a checkpoint is loaded),
    `build_loss`, then `indexed_training_step` per batch; `embed` for evaluation and serving.

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

    def prepare_training(self, *, model: nn.Module, dataset: ImageDataset, device: torch.device) -> np.ndarray | None:
        """Prepare to train `model` on `dataset`; returns the labels batches are drawn by.

        Called once per worker, by every worker, before training (a method may use collective
        `torch.distributed` calls here). The default does nothing.

        Args:
            model: the fresh model from `build_model`, not DDP-wrapped, its initial weights.
            dataset: the training split (training transform).
            device: this worker's device.

        Returns:
            None to draw batches by the dataset's labels; or labels `[N]` int64, one per dataset
            item, that the batch sampler balances on and `indexed_training_step` receives as
            `labels`, where -1 leaves an item out of training.
        """
        return None

    def indexed_training_step(
        self,
        *,
        model: nn.Module,
        loss: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        indices: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """`training_step` for a batch whose dataset indices are known: what the driver calls.

        A method whose mining looks up per-item state from `prepare_training` overrides this;
        the default ignores the indices.

        Args:
            model, loss, images: as in `training_step`.
            labels: `[B]`, from `prepare_training`'s labels where it returned some, else the dataset's.
            indices: `[B]` int64, each image's index in the training dataset.
        """
        return self.training_step(model=model, loss=loss, images=images, labels=labels)

    @abstractmethod
    def embed(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Retrieval embeddings `[B, D]` (L2-normalised) of images `[B, 3, H, W]`."""

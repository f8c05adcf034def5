"""Thesis ch. 2: classification-based fine-tuning of an embedding network.

The class head (a linear layer, or pytorch-metric-learning's normalised-softmax or ArcFace
class weights) lives inside the model, beside the embedding network, and the loss is computed
in the model's forward: so DDP all-reduces the head's gradients like any other weight's and
the driver's optimiser, built over `model.parameters()`, trains it. Retrieval uses only the
embedding; the head is training-only.

How many rows the head has is a property of the training data, not of the job: it is the
number of classes of the training split, counted in `prepare_training`, and it is kept in the
weights (the `class_ids` buffer, the sorted dataset class ids of the head's rows). A saved
package therefore reloads from its job spec and state_dict alone: loading a state_dict sizes
an unsized head from the `class_ids` it holds, and nothing needs the dataset at query time.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from retrieval.config import ClassificationSpec, JobSpec
from retrieval.data.base import ImageDataset
from retrieval.errors import DatasetError
from retrieval.losses.classification import ClassificationHead, ClassificationLoss
from retrieval.losses.metric import MetricLoss
from retrieval.methods.base import RetrievalMethod
from retrieval.models.embedding import EmbeddingNetwork

logger = logging.getLogger(__name__)


class ClassifiedEmbeddingNetwork(nn.Module):
    """An `EmbeddingNetwork` and a class head trained on its embeddings.

    `forward(images)` is the retrieval embedding `[B, D]`; `forward(images, labels)` also
    computes the head's loss, as `{"embeddings": [B, D], "classification": scalar}`. The head
    is created by `size_head` (or by loading a state_dict that holds one) with a row per class.

    Args:
        embedder: the embedding network.
        head: which classification head (see `ClassificationLoss`).
        temperature, arcface_margin, arcface_scale: its settings.
    """

    class_ids: torch.Tensor

    def __init__(
        self,
        *,
        embedder: EmbeddingNetwork,
        head: ClassificationHead,
        temperature: float,
        arcface_margin: float,
        arcface_scale: float,
    ) -> None:
        super().__init__()
        self.embedder = embedder
        self.head_kind = head
        self.temperature = temperature
        self.arcface_margin = arcface_margin
        self.arcface_scale = arcface_scale
        self.register_buffer("class_ids", torch.zeros(0, dtype=torch.int64))
        self.classifier: ClassificationLoss | None = None

    @property
    def is_sized(self) -> bool:
        return self.classifier is not None

    def size_head(self, class_ids: torch.Tensor | np.ndarray) -> None:
        """Create the head with one row per distinct class id, in ascending order.

        Args:
            class_ids: the dataset class ids to classify `[C']` (duplicates are merged).

        Raises:
            ValueError: the head already exists for another set of classes.
        """
        wanted = torch.unique(torch.as_tensor(class_ids, dtype=torch.int64).detach().cpu())
        if self.classifier is not None:
            if torch.equal(wanted, self.class_ids.cpu()):
                return
            raise ValueError(
                f"the class head already has {len(self.class_ids)} classes; cannot resize it to {len(wanted)}"
            )
        device = self.class_ids.device
        self.class_ids = wanted.to(device)
        self.classifier = ClassificationLoss(
            head=self.head_kind,
            num_classes=len(wanted),
            embedding_dim=self.embedder.embedding_dim,
            temperature=self.temperature,
            arcface_margin=self.arcface_margin,
            arcface_scale=self.arcface_scale,
        ).to(device)

    def class_rows(self, labels: torch.Tensor) -> torch.Tensor:
        """The head's row of each dataset class id `[B]` -> `[B]`.

        Raises:
            DatasetError: a label is not one of the head's classes.
        """
        rows = torch.searchsorted(self.class_ids, labels).clamp(max=len(self.class_ids) - 1)
        unknown = self.class_ids[rows] != labels
        if bool(unknown.any()):
            raise DatasetError(
                f"labels {sorted(set(labels[unknown].tolist()))} are not among the {len(self.class_ids)} "
                f"classes the head was sized for (size it from the whole training split: prepare_training)"
            )
        return rows

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        """Embeddings `[B, D]` of images `[B, 3, H, W]`; with labels `[B]`, also the head's loss.

        Returns:
            The L2-normalised embeddings `[B, D]` without labels; with labels,
            `{"embeddings": [B, D], "classification": scalar}`.
        """
        embeddings = self.embedder(images)
        if labels is None:
            return embeddings
        if self.classifier is None:
            raise RuntimeError("the class head has not been sized: call size_head (prepare_training) first")
        return {"embeddings": embeddings, **self.classifier(embeddings, self.class_rows(labels))}

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # A package is rebuilt from its spec, which does not know the number of classes: the
        # weights do, so an unsized head takes its size from them before they are copied in.
        stored = state_dict.get(prefix + "class_ids")
        if self.classifier is None and isinstance(stored, torch.Tensor) and stored.numel() > 0:
            self.size_head(stored)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class Classification(RetrievalMethod):
    """Backbone + GeM + embedding head fine-tuned with a classification loss on its embeddings.

    The loss terms are `classification` (weighted by `classification_weight`) and, when
    `metric_weight` > 0, `metric` (a pytorch-metric-learning verification loss on the same
    embeddings); `loss` is their weighted sum.
    """

    name = "classification"

    def __init__(self, spec: JobSpec) -> None:
        super().__init__(spec)
        if not isinstance(spec.method, ClassificationSpec):
            raise TypeError(f"Classification needs a classification method spec, got {spec.method.name!r}")
        self.method_spec: ClassificationSpec = spec.method

    def build_model(self) -> nn.Module:
        settings = self.method_spec
        return ClassifiedEmbeddingNetwork(
            embedder=EmbeddingNetwork.from_spec(self.spec.model),
            head=settings.head,
            temperature=settings.temperature,
            arcface_margin=settings.arcface_margin,
            arcface_scale=settings.arcface_scale,
        )

    def build_loss(self) -> nn.Module:
        """The optional verification loss (no parameters); the classification loss is in the model."""
        return MetricLoss(loss=self.method_spec.metric_loss)

    def prepare_training(self, *, model: nn.Module, dataset: ImageDataset, device: torch.device) -> np.ndarray | None:
        """Sizes the head to the classes of the training split; batches keep the dataset's labels."""
        if not isinstance(model, ClassifiedEmbeddingNetwork):
            raise TypeError(f"expected the model of build_model, got {type(model).__name__}")
        model.size_head(np.unique(dataset.labels))
        logger.info("classification head: %d classes, %s", len(model.class_ids), self.method_spec.head)
        return None

    def training_step(
        self, *, model: nn.Module, loss: nn.Module, images: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        if isinstance(model, ClassifiedEmbeddingNetwork) and not model.is_sized:
            # Outside the driver (which sizes the head from the whole split first), the head is
            # sized lazily from the first batch, as torch's lazy modules are from their first input.
            logger.warning(
                "sizing the class head from the first batch's classes; an optimiser built before this "
                "step does not hold the head's parameters: call prepare_training before building it"
            )
            model.size_head(labels)
        settings = self.method_spec
        outputs = model(images, labels)
        terms = {"classification": outputs["classification"]}
        total = settings.classification_weight * terms["classification"]
        if settings.metric_weight > 0:
            terms["metric"] = loss(outputs["embeddings"], labels)["metric"]
            total = total + settings.metric_weight * terms["metric"]
        terms["loss"] = total
        return terms

    def embed(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return model(images)

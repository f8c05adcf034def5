"""Thesis ch. 2: unsupervised fine-tuning on pseudo-pairs mined from off-the-shelf features.

Before training, `prepare_training` embeds the training split with the initial model (the
pooled backbone features, before fine-tuning), builds an exact inner-product kNN graph, and
takes mutual k-nearest neighbours as positives, their connected components as pseudo-classes
(the driver draws P x K batches by them) and pairs beyond rank `negative_rank` as the only
negatives. Each batch is then trained with deep_metric's verification loss and miner, the
miner's negatives restricted to far pairs. No dataset label is read.

Every rank gets the same pseudo-pairs: rank 0 mines them and, when a `torch.distributed`
process group is initialised, broadcasts them to the other ranks, so floating-point
differences between devices can never split the pseudo-classes. A resumed job mines them
again from the rebuilt initial model (the same seed gives the same weights), not from the
checkpoint's fine-tuned weights.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from retrieval.config import JobSpec, UnsupervisedMetricSpec
from retrieval.data.base import ImageDataset
from retrieval.data.transforms import eval_transform
from retrieval.errors import DatasetError
from retrieval.evaluation.runs import embed_dataset
from retrieval.losses.metric import MetricLoss
from retrieval.losses.pseudo_pairs import PseudoPairLoss, PseudoPairs, far_pairs, mine_pseudo_pairs
from retrieval.methods.deep_metric import DeepMetric

logger = logging.getLogger(__name__)


def off_the_shelf_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised pooled backbone features `[B, C]` of images `[B, 3, H, W]`.

    These are the inputs of the model's linear embedding `head` (averaged over the calls of a
    multi-scale forward); a model without such a head gives its own output.
    """
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        return F.normalize(model(images), dim=-1)
    captured: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _module, inputs: captured.append(inputs[0]))
    try:
        model(images)
    finally:
        handle.remove()
    return F.normalize(torch.stack(captured).mean(dim=0), dim=-1)


class UnsupervisedMetric(DeepMetric):
    """deep_metric's model and verification loss, trained on mutual-kNN pseudo-pairs."""

    name = "unsupervised_metric"

    def __init__(self, spec: JobSpec) -> None:
        if not isinstance(spec.method, UnsupervisedMetricSpec):
            raise TypeError(f"UnsupervisedMetric needs an unsupervised_metric method spec, got {spec.method.name!r}")
        super().__init__(spec)
        self.settings: UnsupervisedMetricSpec = spec.method
        self.pseudo_pairs: PseudoPairs | None = None
        self._pseudo_labels: torch.Tensor | None = None
        self._sorted_neighbours: torch.Tensor | None = None

    def build_loss(self) -> nn.Module:
        metric = super().build_loss()
        if not isinstance(metric, MetricLoss):
            raise TypeError(f"expected deep_metric's MetricLoss, got {type(metric).__name__}")
        return PseudoPairLoss(metric=metric)

    def mine(self, *, model: nn.Module, dataset: ImageDataset, device: torch.device) -> PseudoPairs:
        """Pseudo-pairs of `dataset` from `model`'s off-the-shelf features (this process only).

        The images go through the job's evaluation transform (no augmentation); labels are
        never looked at.
        """
        dataset_spec = self.spec.dataset
        plain = dataset.with_transform(
            eval_transform(image_size=dataset_spec.image_size, mean=dataset_spec.mean, std=dataset_spec.std)
        )
        was_training = model.training
        model.to(device).eval()
        try:
            features = embed_dataset(
                functools.partial(off_the_shelf_features, model),
                plain,
                batch_size=self.spec.train.embed_batch_size,
                device=device,
            )
        finally:
            model.train(was_training)
        return mine_pseudo_pairs(features, knn_k=self.settings.knn_k, negative_rank=self.settings.negative_rank)

    def prepare_training(self, *, model: nn.Module, dataset: ImageDataset, device: torch.device) -> np.ndarray:
        """Mines the pseudo-pairs (on rank 0, then broadcast) and returns the pseudo-classes `[N]`.

        A collective call when a process group is initialised: every rank must make it.

        Raises:
            DatasetError: the training split is too small for `negative_rank`, or no two images
                are mutual nearest neighbours.
        """
        total = len(dataset)
        if total <= self.settings.negative_rank:
            # Checked on every rank before mining, so no rank waits on a broadcast that never comes.
            raise DatasetError(
                f"unsupervised_metric: negative_rank={self.settings.negative_rank} needs more training "
                f"images than that, the training split has {total}"
            )
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not distributed or dist.get_rank() == 0:
            mined = self.mine(model=model, dataset=dataset, device=device)
            labels = torch.from_numpy(mined.labels).to(device)
            neighbours = torch.from_numpy(mined.neighbours).to(device)
        else:
            labels = torch.empty(total, dtype=torch.int64, device=device)
            neighbours = torch.empty(total, self.settings.negative_rank, dtype=torch.int64, device=device)
        if distributed:
            dist.broadcast(labels, src=0)
            dist.broadcast(neighbours, src=0)
        self.pseudo_pairs = PseudoPairs(labels=labels.cpu().numpy(), neighbours=neighbours.cpu().numpy())
        self._pseudo_labels = labels
        self._sorted_neighbours = neighbours.sort(dim=1).values
        kept = int((self.pseudo_pairs.labels >= 0).sum())
        logger.info(
            "unsupervised_metric: %d pseudo-classes over %d of %d training images "
            "(mutual %d-NN; negatives beyond rank %d)",
            self.pseudo_pairs.num_classes,
            kept,
            total,
            self.settings.knn_k,
            self.settings.negative_rank,
        )
        return self.pseudo_pairs.labels

    def training_step(
        self,
        *,
        model: nn.Module,
        loss: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        indices: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Loss terms of one batch.

        Args:
            model, loss, images: as in `RetrievalMethod.training_step`.
            labels: `[B]` pseudo-classes; ignored when `indices` are given (the mined ones are used).
            indices: `[B]` dataset indices; with them, negatives are restricted to far pairs.
                Without them (no mined state to look up), every pair of different labels may be a negative.
        """
        far = None
        if indices is not None:
            if self._pseudo_labels is None or self._sorted_neighbours is None:
                raise RuntimeError("unsupervised_metric: call prepare_training before training on indexed batches")
            labels = self._pseudo_labels[indices]
            if bool((labels < 0).any()):
                raise DatasetError("unsupervised_metric: the batch holds images that are in no pseudo-class")
            far = far_pairs(self._sorted_neighbours, indices)
        terms = loss(model(images), labels, far)
        terms["loss"] = self.settings.metric_weight * terms["metric"]
        return terms

    def indexed_training_step(
        self,
        *,
        model: nn.Module,
        loss: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        indices: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        return self.training_step(model=model, loss=loss, images=images, labels=labels, indices=indices)

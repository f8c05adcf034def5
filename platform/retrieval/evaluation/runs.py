"""Evaluation runs: embed a dataset with a model and score it, beside simple baselines."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from retrieval.data.base import ImageDataset
from retrieval.evaluation.metrics import retrieval_metrics

logger = logging.getLogger(__name__)

EmbedFunction = Callable[[torch.Tensor], torch.Tensor]

# Scores on held-out images of the training classes (`DatasetSplits.seen_test`) carry this prefix.
SEEN_CLASSES_PREFIX = "seen_classes/"


@torch.no_grad()
def embed_dataset(
    embed: EmbedFunction, dataset: ImageDataset, *, batch_size: int = 256, device: torch.device | str = "cpu"
) -> np.ndarray:
    """Embeddings `[N, D]` float32 of every item of a dataset, in dataset order.

    Args:
        embed: maps a batch `[B, 3, H, W]` on `device` to `[B, D]`.
        dataset: yields `(image [3, H, W], label, index)`.
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    chunks = [embed(images.to(device)).float().cpu().numpy() for images, _, _ in loader]
    return np.concatenate(chunks).astype(np.float32, copy=False)


def raw_pixel_embeddings(dataset: ImageDataset, *, batch_size: int = 256) -> np.ndarray:
    """The baseline with no model: preprocessed pixels, flattened and L2-normalised, `[N, 3*H*W]`."""
    return embed_dataset(
        lambda images: torch.nn.functional.normalize(images.flatten(1), dim=1), dataset, batch_size=batch_size
    )


def score_embeddings(embeddings: np.ndarray, labels: np.ndarray, *, ks: Sequence[int]) -> dict[str, float]:
    """Recall@K and mAP@R of leave-one-out retrieval within a set (each item a query)."""
    return retrieval_metrics(embeddings=embeddings, labels=labels, ks=tuple(ks))

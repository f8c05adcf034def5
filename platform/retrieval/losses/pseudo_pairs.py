"""Pseudo-pairs for unsupervised fine-tuning (thesis ch. 2), mined on a kNN graph of features.

Images that are among each other's k nearest neighbours (mutual kNN) are positives, and the
connected components of the mutual-kNN graph are pseudo-classes; a pair of images is a
negative only when neither lies among the other's `negative_rank` nearest neighbours. The
verification losses and miners are pytorch-metric-learning's (via `MetricLoss`): this module
only builds the graph and restricts the mined negatives to far pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.utils import loss_and_miner_utils as pml_mining
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch import nn

from retrieval.errors import DatasetError
from retrieval.losses.metric import MetricLoss

IndicesTuple = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class PseudoPairs:
    """What the kNN graph of a set of N images gives.

    Attributes:
        labels: pseudo-class of each image `[N]` int64, numbered 0, 1, ... in the order of
            each class's first image; -1 for an image in no mutual-kNN pair.
        neighbours: each image's `negative_rank` nearest other images `[N, R]` int64, nearest
            first; every pair not in this table (either way round) is far.
    """

    labels: np.ndarray
    neighbours: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if self.labels.size else 0


def nearest_neighbours(features: np.ndarray, *, count: int) -> np.ndarray:
    """Each row's `count` nearest other rows by inner product, by exact search (Faiss `IndexFlatIP`).

    Args:
        features: `[N, D]`; L2-normalised rows make this cosine similarity.
        count: how many neighbours, at most N - 1.

    Returns:
        `[N, count]` int64 row indices, most similar first, the row itself excluded.

    >>> nearest_neighbours(np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]), count=1).ravel().tolist()
    [1, 0, 1]
    """
    vectors = np.ascontiguousarray(features, dtype=np.float32)
    total = len(vectors)
    if not 1 <= count <= total - 1:
        raise ValueError(f"count must lie in [1, N - 1] = [1, {total - 1}] for N = {total} features, got {count}")
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    _, found = index.search(vectors, count + 1)
    is_self = found == np.arange(total)[:, None]
    # An exact duplicate may outrank a row itself; then the row is missing and the last hit goes.
    is_self[~is_self.any(axis=1), -1] = True
    return found[~is_self].reshape(total, count).astype(np.int64)


def mutual_knn_classes(neighbours: np.ndarray, *, knn_k: int) -> np.ndarray:
    """Pseudo-classes: connected components of the mutual k-nearest-neighbour graph.

    Images i and j are joined when j is among i's first `knn_k` neighbours and i among j's.
    Components of one image (no mutual neighbour) get -1.

    Args:
        neighbours: `[N, R]` neighbour table, nearest first, R >= `knn_k`.
        knn_k: k.

    Returns:
        `[N]` int64 class ids 0, 1, ... numbered by each component's first image, or -1.
    """
    total = len(neighbours)
    if not 1 <= knn_k <= neighbours.shape[1]:
        raise ValueError(f"knn_k must lie in [1, {neighbours.shape[1]}] (the table's width), got {knn_k}")
    rows = np.repeat(np.arange(total), knn_k)
    columns = neighbours[:, :knn_k].ravel()
    directed = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, columns)), shape=(total, total)).tocsr()
    mutual = directed.multiply(directed.T)
    _, components = connected_components(mutual, directed=False)
    sizes = np.bincount(components)
    _, first_member = np.unique(components, return_index=True)
    kept = np.flatnonzero(sizes >= 2)
    order = kept[np.argsort(first_member[kept], kind="stable")]
    renumbered = np.full(len(sizes), -1, dtype=np.int64)
    renumbered[order] = np.arange(len(order))
    return renumbered[components]


def mine_pseudo_pairs(features: np.ndarray, *, knn_k: int, negative_rank: int) -> PseudoPairs:
    """Pseudo-classes and the near-pair table of N images from their features.

    Args:
        features: `[N, D]` L2-normalised features (e.g. off-the-shelf, before fine-tuning).
        knn_k: k of the mutual-kNN positives.
        negative_rank: pairs within this rank (either way round) are never negatives.

    Raises:
        DatasetError: fewer than `negative_rank` + 1 images (no pair would be far), or no
            mutual-kNN pair at all.
    """
    total = len(features)
    if total <= negative_rank:
        raise DatasetError(
            f"mining far negatives beyond rank negative_rank={negative_rank} needs more than "
            f"{negative_rank} training images, got {total}"
        )
    neighbours = nearest_neighbours(features, count=negative_rank)
    labels = mutual_knn_classes(neighbours, knn_k=knn_k)
    if labels.max(initial=-1) < 0:
        raise DatasetError(f"no two of the {total} training images are mutual {knn_k}-nearest neighbours")
    return PseudoPairs(labels=labels, neighbours=neighbours)


def far_pairs(sorted_neighbours: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Which pairs of a batch are far apart: neither is among the other's near neighbours.

    Args:
        sorted_neighbours: `[N, R]` neighbour table of the whole dataset, each row sorted ascending.
        indices: `[B]` dataset indices of the batch.

    Returns:
        `[B, B]` bool, symmetric; `[a, b]` is True when `indices[b]` is not in row `indices[a]`
        and `indices[a]` is not in row `indices[b]`.
    """
    rows = sorted_neighbours[indices]
    others = indices.unsqueeze(0).expand(len(indices), -1).contiguous()
    positions = torch.searchsorted(rows, others).clamp(max=rows.shape[1] - 1)
    near = rows.gather(1, positions) == others
    return ~(near | near.T)


def keep_far_negatives(indices_tuple: IndicesTuple, far: torch.Tensor) -> IndicesTuple:
    """Drops the pairs/triplets whose negative is not far from its anchor.

    Args:
        indices_tuple: pytorch-metric-learning pairs `(a1, p, a2, n)` or triplets `(a, p, n)`.
        far: `[B, B]` bool from `far_pairs`.
    """
    if len(indices_tuple) == 4:
        first_anchor, positive, anchor, negative = indices_tuple
        keep = far[anchor, negative]
        return first_anchor, positive, anchor[keep], negative[keep]
    if len(indices_tuple) == 3:
        keep = far[indices_tuple[0], indices_tuple[2]]
        return tuple(part[keep] for part in indices_tuple)
    raise ValueError(f"expected pairs (4 tensors) or triplets (3 tensors), got {len(indices_tuple)} tensors")


class PseudoPairLoss(nn.Module):
    """A `MetricLoss` whose mined negatives are restricted to far pairs.

    Positives are pairs of the same pseudo-class (the labels given); negatives are pairs of
    different pseudo-classes that are also far (`far_pairs`). Without a miner, every such
    pair (or triplet, for the triplet loss) is used.

    Args:
        metric: the verification loss and miner.
    """

    def __init__(self, *, metric: MetricLoss) -> None:
        super().__init__()
        self.metric = metric

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, far: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Loss of a batch.

        Args:
            embeddings: `[B, D]`, L2-normalised.
            labels: `[B]` pseudo-classes.
            far: `[B, B]` bool, the pairs that may be negatives; None allows every pair.

        Returns:
            `{"metric": scalar}`; zero (with a gradient path) when nothing is left to train on.
        """
        if self.metric.miner is not None:
            indices_tuple: IndicesTuple = tuple(self.metric.miner(embeddings, labels))
        elif isinstance(self.metric.loss, pml_losses.TripletMarginLoss):
            indices_tuple = tuple(pml_mining.get_all_triplets_indices(labels))
        else:
            indices_tuple = tuple(pml_mining.get_all_pairs_indices(labels))
        if far is not None:
            indices_tuple = keep_far_negatives(indices_tuple, far)
        return {"metric": self.metric.loss(embeddings, labels, indices_tuple)}

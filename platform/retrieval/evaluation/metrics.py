"""Retrieval metrics over embeddings: exact kNN search, Recall@K and MAP@R.

Pure functions on numpy arrays; the search is Faiss's exact flat index. Evaluation is
leave-one-out on the test set: every item is a query against all the other items.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import faiss
import numpy as np

Metric = Literal["ip", "l2"]


def _as_float32_matrix(name: str, array: np.ndarray) -> np.ndarray:
    matrix = np.ascontiguousarray(array, dtype=np.float32)
    if matrix.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, D], got shape {matrix.shape}")
    return matrix


def _as_labels(labels: np.ndarray, *, num_items: int) -> np.ndarray:
    label_array = np.asarray(labels)
    if label_array.shape != (num_items,):
        raise ValueError(f"labels must have shape [{num_items}] (one per embedding), got {label_array.shape}")
    return label_array


def knn_search(
    *,
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    metric: Metric = "ip",
    exclude_self: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-nearest-neighbour search (Faiss `IndexFlatIP` or `IndexFlatL2`).

    Args:
        queries: Query vectors `[Q, D]`.
        gallery: Gallery vectors `[N, D]`.
        k: Neighbours per query; at most `N` (`N - 1` with `exclude_self`).
        metric: "ip" ranks by inner product (descending; cosine similarity for
            L2-normalised vectors), "l2" by squared Euclidean distance (ascending).
        exclude_self: `queries` is `gallery` in the same order and a query must not
            retrieve itself. Searches `k + 1` neighbours and drops the query's own index
            wherever it ranks (with duplicates it may tie with, or rank after, another
            item); when it is not among them, the last neighbour is dropped instead.

    Returns:
        `(scores [Q, k] float32, indices [Q, k] int64)`, best first: inner products for
        "ip", squared distances for "l2".

    Raises:
        ValueError: Bad shapes, dimension mismatch, bad `metric`, or `k` out of range.

    >>> vectors = np.eye(3, dtype=np.float32)
    >>> knn_search(queries=vectors[:1], gallery=vectors, k=1)[1].tolist()
    [[0]]
    >>> knn_search(queries=vectors, gallery=vectors, k=2, metric="l2", exclude_self=True)[1].tolist()
    [[1, 2], [0, 2], [0, 1]]
    """
    query_matrix = _as_float32_matrix("queries", queries)
    gallery_matrix = _as_float32_matrix("gallery", gallery)
    if query_matrix.shape[1] != gallery_matrix.shape[1]:
        raise ValueError(
            f"queries have dimension {query_matrix.shape[1]} but the gallery has {gallery_matrix.shape[1]}"
        )
    if exclude_self and query_matrix.shape[0] != gallery_matrix.shape[0]:
        raise ValueError(
            f"exclude_self needs queries to be the gallery, got {query_matrix.shape[0]} queries "
            f"and {gallery_matrix.shape[0]} gallery items"
        )
    max_k = gallery_matrix.shape[0] - 1 if exclude_self else gallery_matrix.shape[0]
    if not 1 <= k <= max_k:
        raise ValueError(
            f"k must lie in [1, {max_k}] for a gallery of {gallery_matrix.shape[0]} items"
            f"{' excluding the query itself' if exclude_self else ''}, got k={k}"
        )
    if metric == "ip":
        index: faiss.Index = faiss.IndexFlatIP(gallery_matrix.shape[1])
    elif metric == "l2":
        index = faiss.IndexFlatL2(gallery_matrix.shape[1])
    else:
        raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")
    index.add(gallery_matrix)
    scores, indices = index.search(query_matrix, k + 1 if exclude_self else k)
    indices = indices.astype(np.int64)
    if not exclude_self:
        return scores, indices
    is_self = indices == np.arange(len(indices), dtype=np.int64)[:, None]
    # Rows where the query is not among the k + 1 neighbours lose their last one, so every
    # row keeps exactly k entries, in rank order.
    drop = is_self.copy()
    drop[~is_self.any(axis=1), -1] = True
    keep = ~drop
    return scores[keep].reshape(len(scores), k), indices[keep].reshape(len(indices), k)


def _same_label_ranks(
    embeddings: np.ndarray, labels: np.ndarray, *, k: int, metric: Metric, queries: np.ndarray | None = None
) -> np.ndarray:
    """Whether each of the k leave-one-out neighbours shares the query's label `[N, k]`."""
    searched = embeddings if queries is None else queries
    _, neighbours = knn_search(queries=searched, gallery=embeddings, k=k, metric=metric, exclude_self=True)
    hits: np.ndarray = labels[neighbours] == labels[:, None]
    return hits


def _other_items_of_class(labels: np.ndarray) -> np.ndarray:
    """R per query: the number of other items with the query's label `[N]`."""
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return counts[inverse.reshape(-1)] - 1


def _check_ks(ks: Sequence[int], *, num_items: int) -> list[int]:
    chosen = sorted({int(k) for k in ks})
    if not chosen:
        raise ValueError("ks must name at least one k")
    if chosen[0] < 1 or chosen[-1] > num_items - 1:
        raise ValueError(f"every k must lie in [1, {num_items - 1}] for {num_items} items, got ks={list(ks)}")
    return chosen


def _recall_from_hits(hits: np.ndarray, valid: np.ndarray, ks: list[int]) -> dict[str, float]:
    return {f"recall@{k}": float(hits[valid, :k].any(axis=1).mean()) for k in ks}


def _map_at_r_from_hits(hits: np.ndarray, other_counts: np.ndarray, valid: np.ndarray) -> float:
    # AP@R = (1/R) sum_{i<=R} P(i) rel(i): only the first R ranks count, R varies per query.
    ranks = np.arange(1, hits.shape[1] + 1)
    within_r = ranks[None, :] <= other_counts[:, None]
    relevant = hits & within_r
    precision_at_rank = np.cumsum(relevant, axis=1) / ranks[None, :]
    average_precision = (precision_at_rank * relevant).sum(axis=1)[valid] / other_counts[valid]
    return float(average_precision.mean())


def _validated(embeddings: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    matrix = _as_float32_matrix("embeddings", embeddings)
    label_array = _as_labels(labels, num_items=matrix.shape[0])
    other_counts = _other_items_of_class(label_array)
    valid = other_counts > 0
    if not valid.any():
        raise ValueError(
            f"no query has another item of its class among the {len(label_array)} items: "
            "retrieval metrics are undefined"
        )
    return matrix, label_array, other_counts, valid


def recall_at_k(
    *,
    embeddings: np.ndarray,
    labels: np.ndarray,
    ks: Sequence[int] = (1, 2, 4, 8),
    metric: Metric = "ip",
) -> dict[str, float]:
    """Recall@K, leave-one-out: each item queries all the other items.

    A query scores a hit at K when any of its K nearest other items has its label.
    Queries whose class has no other item cannot hit and are left out of the average.

    Args:
        embeddings: Item embeddings `[N, D]`.
        labels: Class of each item `[N]`.
        ks: The K values, each in `[1, N - 1]`.
        metric: "ip" or "l2", as in `knn_search`.

    Returns:
        {"recall@1": ..., "recall@2": ...} for the sorted distinct `ks`, each in [0, 1].

    Raises:
        ValueError: Bad shapes or ks, or no query has another item of its class.

    >>> embeddings = np.array([[1, 0], [1, 0.1], [0, 1], [0.1, 1]], dtype=np.float32)
    >>> recall_at_k(embeddings=embeddings, labels=np.array([0, 0, 1, 1]), ks=(1,))
    {'recall@1': 1.0}
    """
    matrix, label_array, _, valid = _validated(embeddings, labels)
    chosen = _check_ks(ks, num_items=len(label_array))
    hits = _same_label_ranks(matrix, label_array, k=chosen[-1], metric=metric)
    return _recall_from_hits(hits, valid, chosen)


def map_at_r(*, embeddings: np.ndarray, labels: np.ndarray, metric: Metric = "ip") -> float:
    """MAP@R of Musgrave et al., "A Metric Learning Reality Check" (ECCV 2020), eq. 2.

    For a query with R other items of its class, AP@R = (1/R) sum_{i<=R} P(i) rel(i),
    where rel(i) says whether the i-th nearest other item shares the label and P(i) is
    the precision of the first i neighbours. Leave-one-out like `recall_at_k`; queries
    whose class has no other item (R = 0) are left out of the mean.

    Args:
        embeddings: Item embeddings `[N, D]`.
        labels: Class of each item `[N]`.
        metric: "ip" or "l2", as in `knn_search`.

    Returns:
        The mean of AP@R over the queries, in [0, 1].

    Raises:
        ValueError: Bad shapes, or no query has another item of its class.

    >>> embeddings = np.array([[1, 0], [0.9, 0.1], [0.7, 0.3], [0, 1]], dtype=np.float32)
    >>> round(map_at_r(embeddings=embeddings, labels=np.array([0, 0, 1, 1]), metric="l2"), 4)
    0.75
    """
    matrix, label_array, other_counts, valid = _validated(embeddings, labels)
    hits = _same_label_ranks(matrix, label_array, k=int(other_counts.max()), metric=metric)
    return _map_at_r_from_hits(hits, other_counts, valid)


def retrieval_metrics(
    *,
    embeddings: np.ndarray,
    labels: np.ndarray,
    ks: Sequence[int] = (1, 2, 4, 8),
    metric: Metric = "ip",
    queries: np.ndarray | None = None,
) -> dict[str, float]:
    """Recall@K and MAP@R from one leave-one-out kNN search.

    Same definitions as `recall_at_k` and `map_at_r`; the search runs once with
    `k = max(max(ks), max R)`.

    Args:
        embeddings: Item embeddings `[N, D]`.
        labels: Class of each item `[N]`.
        ks: The K values of Recall@K, each in `[1, N - 1]`.
        metric: "ip" or "l2", as in `knn_search`.
        queries: Query-side vectors `[N, D]` of the same items (e.g. after query expansion);
            item i searches with `queries[i]` among the other items' `embeddings`. Default:
            the embeddings themselves.

    Returns:
        {"recall@1": ..., ..., "map@r": ...}.

    Raises:
        ValueError: Bad shapes or ks, or no query has another item of its class.
    """
    matrix, label_array, other_counts, valid = _validated(embeddings, labels)
    query_matrix = None
    if queries is not None:
        query_matrix = _as_float32_matrix("queries", queries)
        if query_matrix.shape != matrix.shape:
            raise ValueError(f"queries must match the embeddings' shape {matrix.shape}, got {query_matrix.shape}")
    chosen = _check_ks(ks, num_items=len(label_array))
    hits = _same_label_ranks(
        matrix, label_array, k=max(chosen[-1], int(other_counts.max())), metric=metric, queries=query_matrix
    )
    results = _recall_from_hits(hits, valid, chosen)
    results["map@r"] = _map_at_r_from_hits(hits, other_counts, valid)
    return results

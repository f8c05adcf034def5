"""Exact merge of per-shard top-k results into one global top-k."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from retrieval.index.manifest import IndexMetric

# The values Faiss pads a short result row with (id -1), so a merged row looks the same; a
# binary shard's padding is shown as an l2 one's (`LoadedShard.search`).
_PADDING_SCORE = {
    "ip": -np.finfo(np.float32).max,
    "l2": np.finfo(np.float32).max,
    "hamming": np.finfo(np.float32).max,
}
# Metrics whose scores are distances: smaller is better.
_ASCENDING = ("l2", "hamming")


def merge_topk(
    *,
    results: Sequence[tuple[np.ndarray, np.ndarray]],
    k: int,
    metric: IndexMetric,
) -> tuple[np.ndarray, np.ndarray]:
    """Merge the top-k lists of several shards into the exact global top-k.

    Since every global top-k neighbour is in its own shard's top-k, taking the best ``k``
    of the union of the shards' lists equals searching the unsharded index.

    Args:
        results: one ``(scores [Q, k_i], ids [Q, k_i])`` pair per shard, same ``Q`` for all;
            id ``-1`` marks Faiss padding.
        k: neighbours to keep per query, >= 1.
        metric: ``"ip"`` (higher score is better), ``"l2"`` or ``"hamming"`` (distances: lower is
            better; Hamming distances are whole numbers, exact in float32).

    Returns:
        Scores ``[Q, k]`` float32 and ids ``[Q, k]`` int64, best first; equal scores are
        ordered by ascending id, so the order is deterministic; padding (id ``-1``) comes
        last, and rows with fewer than ``k`` real results are padded like Faiss does.

    Example:
        >>> scores, ids = merge_topk(
        ...     results=[(np.array([[0.9, 0.5]]), np.array([[3, 1]])), (np.array([[0.7, -3e38]]), np.array([[8, -1]]))],
        ...     k=3, metric="ip")
        >>> ids.tolist()
        [[3, 8, 1]]
    """
    if metric not in _PADDING_SCORE:
        raise ValueError(f"metric must be 'ip', 'l2' or 'hamming', got {metric!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not results:
        raise ValueError("results must hold at least one (scores, ids) pair")
    all_scores: list[np.ndarray] = []
    all_ids: list[np.ndarray] = []
    for position, (scores, ids) in enumerate(results):
        scores = np.asarray(scores, dtype=np.float32)
        ids = np.asarray(ids, dtype=np.int64)
        if scores.ndim != 2 or scores.shape != ids.shape:
            raise ValueError(
                f"result {position}: scores {scores.shape} and ids {ids.shape} must be 2-D arrays of one shape"
            )
        if all_scores and scores.shape[0] != all_scores[0].shape[0]:
            raise ValueError(
                f"result {position} has {scores.shape[0]} query rows, result 0 has {all_scores[0].shape[0]}"
            )
        all_scores.append(scores)
        all_ids.append(ids)

    scores = np.concatenate(all_scores, axis=1)
    ids = np.concatenate(all_ids, axis=1)
    padding = ids < 0
    rank_key = scores if metric in _ASCENDING else -scores
    # lexsort sorts by the LAST key first: padding last, then best score, then smaller id.
    order = np.lexsort((ids, rank_key, padding), axis=-1)[:, :k]
    merged_scores = np.take_along_axis(scores, order, axis=1)
    merged_ids = np.take_along_axis(ids, order, axis=1)
    merged_scores[merged_ids < 0] = _PADDING_SCORE[metric]
    merged_ids[merged_ids < 0] = -1

    missing = k - merged_ids.shape[1]
    if missing > 0:
        rows = merged_ids.shape[0]
        merged_scores = np.hstack([merged_scores, np.full((rows, missing), _PADDING_SCORE[metric], np.float32)])
        merged_ids = np.hstack([merged_ids, np.full((rows, missing), -1, np.int64)])
    return merged_scores, merged_ids

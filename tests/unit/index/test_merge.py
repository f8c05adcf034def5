"""merge_topk on hand-built per-shard lists."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.index import merge_topk

FLT_MAX = np.finfo(np.float32).max


def test_ip_merge_keeps_the_best_and_orders_ties_by_id() -> None:
    first = (np.array([[0.9, 0.5, 0.5]]), np.array([[4, 9, 2]]))
    second = (np.array([[0.5, 0.1, -FLT_MAX]]), np.array([[7, 3, -1]]))
    scores, ids = merge_topk(results=[first, second], k=4, metric="ip")
    assert ids.tolist() == [[4, 2, 7, 9]]
    assert scores.tolist() == np.array([[0.9, 0.5, 0.5, 0.5]], np.float32).tolist()
    assert (scores.dtype, ids.dtype) == (np.float32, np.int64)


def test_l2_merge_prefers_small_distances_per_row() -> None:
    first = (np.array([[0.0, 2.0], [1.0, 5.0]]), np.array([[1, 2], [1, 2]]))
    second = (np.array([[1.0, 3.0], [0.5, 6.0]]), np.array([[10, 11], [10, 11]]))
    scores, ids = merge_topk(results=[first, second], k=3, metric="l2")
    assert ids.tolist() == [[1, 10, 2], [10, 1, 2]]
    assert scores.tolist() == [[0.0, 1.0, 2.0], [0.5, 1.0, 5.0]]


def test_hamming_merge_ranks_whole_distances_ascending_ties_by_id() -> None:
    # Three shards' top-3 lists of Hamming distances, padding (id -1) in the last one.
    first = (np.array([[2.0, 5.0, 5.0]]), np.array([[8, 3, 12]]))
    second = (np.array([[0.0, 5.0, 7.0]]), np.array([[20, 1, 21]]))
    third = (np.array([[5.0, FLT_MAX, FLT_MAX]]), np.array([[30, -1, -1]]))
    scores, ids = merge_topk(results=[first, second, third], k=5, metric="hamming")
    assert ids.tolist() == [[20, 8, 1, 3, 12]]
    assert scores.tolist() == [[0.0, 2.0, 5.0, 5.0, 5.0]]


@pytest.mark.parametrize(("metric", "padding"), [("ip", -FLT_MAX), ("l2", FLT_MAX), ("hamming", FLT_MAX)])
def test_padding_goes_last_and_short_rows_are_padded(metric: str, padding: float) -> None:
    # A padded entry whose score would otherwise rank first must still come last.
    first = (np.array([[-padding, 1.0]]), np.array([[-1, 5]]))
    second = (np.array([[2.0]]), np.array([[6]]))
    scores, ids = merge_topk(results=[first, second], k=5, metric=metric)  # type: ignore[arg-type]
    best_first = [6, 5] if metric == "ip" else [5, 6]  # hamming ranks like l2: smaller first
    assert ids.tolist() == [[*best_first, -1, -1, -1]]
    assert scores[0, 2:].tolist() == [padding] * 3


def test_merge_rejects_inconsistent_inputs() -> None:
    one = (np.zeros((2, 3)), np.zeros((2, 3), np.int64))
    with pytest.raises(ValueError, match="k must be >= 1"):
        merge_topk(results=[one], k=0, metric="ip")
    with pytest.raises(ValueError, match="at least one"):
        merge_topk(results=[], k=1, metric="ip")
    with pytest.raises(ValueError, match="result 1 has 1 query rows, result 0 has 2"):
        merge_topk(results=[one, (np.zeros((1, 3)), np.zeros((1, 3)))], k=1, metric="ip")
    with pytest.raises(ValueError, match=r"result 0: scores \(2, 3\) and ids \(2, 2\)"):
        merge_topk(results=[(np.zeros((2, 3)), np.zeros((2, 2)))], k=1, metric="ip")
    with pytest.raises(ValueError, match="metric must be"):
        merge_topk(results=[one], k=1, metric="cos")  # type: ignore[arg-type]

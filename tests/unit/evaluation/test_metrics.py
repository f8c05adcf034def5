"""Retrieval metrics against brute-force references, hand-computed numbers and pytorch-metric-learning.

Tie policy: faiss breaks score ties in its own order. Tests with exact ties either
compare tie-aware (a returned neighbour is right when its true score equals the
reference score at that rank) or put tied items in the same class, so the tie order
cannot change a metric.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from retrieval.evaluation import Metric, knn_search, map_at_r, recall_at_k, retrieval_metrics


def _scores(queries: np.ndarray, gallery: np.ndarray, metric: Metric) -> np.ndarray:
    """Full score matrix in float64: inner products, or squared distances for "l2" `[Q, N]`."""
    queries64, gallery64 = queries.astype(np.float64), gallery.astype(np.float64)
    if metric == "ip":
        return queries64 @ gallery64.T
    return ((queries64[:, None, :] - gallery64[None, :, :]) ** 2).sum(axis=2)


def _reference_ranking(embeddings: np.ndarray, metric: Metric) -> list[list[int]]:
    """For each item, all other items best first (ties by index), from the full matrix."""
    scores = _scores(embeddings, embeddings, metric)
    order_key = -scores if metric == "ip" else scores
    rankings = []
    for query in range(len(embeddings)):
        order = np.argsort(order_key[query], kind="stable")
        rankings.append([int(item) for item in order if item != query])
    return rankings


def _reference_metrics(
    embeddings: np.ndarray, labels: np.ndarray, ks: tuple[int, ...], metric: Metric
) -> dict[str, float]:
    """Recall@K and MAP@R by plain loops over the brute-force rankings."""
    hits_at: dict[int, list[bool]] = {k: [] for k in ks}
    average_precisions = []
    for query, ranking in enumerate(_reference_ranking(embeddings, metric)):
        relevant = [labels[item] == labels[query] for item in ranking]
        num_relevant = sum(relevant)
        if num_relevant == 0:
            continue
        for k in ks:
            hits_at[k].append(any(relevant[:k]))
        found, precision_sum = 0, 0.0
        for rank in range(1, num_relevant + 1):
            if relevant[rank - 1]:
                found += 1
                precision_sum += found / rank
        average_precisions.append(precision_sum / num_relevant)
    result = {f"recall@{k}": float(np.mean(hits_at[k])) for k in ks}
    result["map@r"] = float(np.mean(average_precisions))
    return result


def _random_data(
    seed: int, *, num_items: int = 150, dim: int = 12, num_classes: int = 7
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=num_items)
    # Class means make the metrics land strictly between 0 and 1, away from trivial values.
    embeddings = rng.normal(size=(num_classes, dim))[labels] * 0.8 + rng.normal(size=(num_items, dim))
    labels[-1] = num_classes  # a class with a single item: its query must be left out
    return embeddings.astype(np.float32), labels


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_knn_search_matches_brute_force(seed: int, metric: Metric) -> None:
    rng = np.random.default_rng(seed)
    queries = rng.normal(size=(20, 8)).astype(np.float32)
    gallery = rng.normal(size=(60, 8)).astype(np.float32)
    scores, indices = knn_search(queries=queries, gallery=gallery, k=5, metric=metric)
    reference = _scores(queries, gallery, metric)
    expected = np.argsort(-reference if metric == "ip" else reference, axis=1, kind="stable")[:, :5]
    assert indices.dtype == np.int64 and indices.shape == (20, 5)
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(reference, expected, axis=1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_metrics_match_brute_force_on_random_data(seed: int, metric: Metric) -> None:
    embeddings, labels = _random_data(seed)
    expected = _reference_metrics(embeddings, labels, (1, 2, 4, 8), metric)
    assert 0.05 < expected["map@r"] < 0.95
    combined = retrieval_metrics(embeddings=embeddings, labels=labels, metric=metric)
    assert combined.keys() == expected.keys()
    for key, value in expected.items():
        assert combined[key] == pytest.approx(value, abs=1e-12), key
    assert recall_at_k(embeddings=embeddings, labels=labels, metric=metric) == {
        key: value for key, value in combined.items() if key != "map@r"
    }
    assert map_at_r(embeddings=embeddings, labels=labels, metric=metric) == pytest.approx(combined["map@r"], abs=1e-12)


def _tied_data(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer vectors (every score below 2**24: exact in float32, so ties are exact), duplicated.

    Every duplicate group lies within one class, so tie order cannot change a metric.
    """
    rng = np.random.default_rng(seed)
    # A wide value range keeps accidental ties between distinct vectors rare.
    distinct = rng.integers(-500, 501, size=(25, 6))
    distinct_labels = rng.integers(0, 5, size=25)
    copies = rng.integers(1, 5, size=25)
    return np.repeat(distinct, copies, axis=0).astype(np.float32), np.repeat(distinct_labels, copies)


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_with_exact_ties_match_brute_force(seed: int, metric: Metric) -> None:
    embeddings, labels = _tied_data(seed)
    # The premise of the comparison: no tie mixes relevant and irrelevant items (a distinct
    # vector could in principle tie with another class's; these seeds have no such case).
    scores = _scores(embeddings, embeddings, metric)
    assert len(embeddings) > len(np.unique(embeddings, axis=0))
    for query in range(len(embeddings)):
        for score in np.unique(scores[query]):
            tied = np.flatnonzero(scores[query] == score)
            tied = tied[tied != query]
            assert len({labels[item] == labels[query] for item in tied}) <= 1
    expected = _reference_metrics(embeddings, labels, (1, 2, 4), metric)
    result = retrieval_metrics(embeddings=embeddings, labels=labels, ks=(1, 2, 4), metric=metric)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-12), key


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exclude_self_with_duplicates_is_tie_aware_correct(seed: int, metric: Metric) -> None:
    embeddings, _ = _tied_data(seed)
    k = 5
    scores, indices = knn_search(queries=embeddings, gallery=embeddings, k=k, metric=metric, exclude_self=True)
    true_scores = _scores(embeddings, embeddings, metric)
    for query in range(len(embeddings)):
        others = np.delete(true_scores[query], query)
        best = np.sort(others)[::-1][:k] if metric == "ip" else np.sort(others)[:k]
        assert query not in indices[query]
        assert len(set(indices[query].tolist())) == k
        # Right up to ties: each returned item really has the reference score of its rank.
        np.testing.assert_array_equal(true_scores[query, indices[query]], best)
        np.testing.assert_array_equal(scores[query], best)


def test_exclude_self_drops_the_query_even_when_it_does_not_rank_first() -> None:
    # Inner products are not maximal on the diagonal: [1, 0] scores 2 with [2, 0] but 1
    # with itself, so items 0 and 2 rank second in their own searches.
    embeddings = np.array([[1, 0], [2, 0], [0.5, 1], [0.1, 3]], dtype=np.float32)
    scores, indices = knn_search(queries=embeddings, gallery=embeddings, k=2, exclude_self=True)
    assert indices.tolist() == [[1, 2], [0, 2], [3, 1], [2, 1]]
    np.testing.assert_allclose(scores, np.array([[2, 0.5], [2, 1], [3.05, 1], [3.05, 0.2]]), rtol=1e-6)


def test_exclude_self_when_all_k_plus_1_neighbours_are_duplicates() -> None:
    # Six identical items, k + 1 = 3: faiss returns three of them, for most queries not
    # including the query itself, so the last neighbour must go instead.
    embeddings = np.ones((6, 3), dtype=np.float32)
    scores, indices = knn_search(queries=embeddings, gallery=embeddings, k=2, metric="l2", exclude_self=True)
    assert scores.tolist() == [[0.0, 0.0]] * 6
    for query, row in enumerate(indices.tolist()):
        assert query not in row and len(set(row)) == 2


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_perfect_embedder_scores_exactly_one(metric: Metric) -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, size=120)
    embeddings = (np.eye(6)[labels] + rng.normal(scale=1e-3, size=(120, 6))).astype(np.float32)
    result = retrieval_metrics(embeddings=embeddings, labels=labels, metric=metric)
    assert result == {"recall@1": 1.0, "recall@2": 1.0, "recall@4": 1.0, "recall@8": 1.0, "map@r": 1.0}


# Five items on a line (squared distance keeps the order of |x_i - x_j|):
#   x      0  1  4  6  13,  labels  0  0  1  0  1
#   query 0: ranking 1 2 3 4 -> relevance 1 0 1 0, R=2, AP@R = 1/2 (1/1)        = 0.5
#   query 1: ranking 0 2 3 4 -> relevance 1 0 1 0, R=2, AP@R = 1/2 (1/1)        = 0.5
#   query 2: ranking 3 1 0 4 -> relevance 0 0 0 1, R=1, AP@R = 0
#   query 3: ranking 2 1 0 4 -> relevance 0 1 1 0, R=2, AP@R = 1/2 (1/2)        = 0.25
#   query 4: ranking 3 2 1 0 -> relevance 0 1 0 0, R=1, AP@R = 0
# MAP@R = 1.25 / 5 = 0.25; first hit at ranks 1 1 4 2 2 -> R@1 = 0.4, R@2 = 0.8, R@4 = 1.
HAND_EMBEDDINGS = np.array([[0], [1], [4], [6], [13]], dtype=np.float32)
HAND_LABELS = np.array([0, 0, 1, 0, 1])
HAND_EXPECTED = {"recall@1": 0.4, "recall@2": 0.8, "recall@4": 1.0, "map@r": 0.25}


def test_hand_computed_five_items() -> None:
    result = retrieval_metrics(embeddings=HAND_EMBEDDINGS, labels=HAND_LABELS, ks=(1, 2, 4), metric="l2")
    assert result == pytest.approx(HAND_EXPECTED, abs=1e-12)
    assert map_at_r(embeddings=HAND_EMBEDDINGS, labels=HAND_LABELS, metric="l2") == pytest.approx(0.25)


def test_queries_of_single_item_classes_are_left_out() -> None:
    # A far-away item of its own class ranks last for everyone and is never averaged in.
    embeddings = np.vstack([HAND_EMBEDDINGS, [[100.0]]]).astype(np.float32)
    labels = np.append(HAND_LABELS, 2)
    result = retrieval_metrics(embeddings=embeddings, labels=labels, ks=(1, 2, 4), metric="l2")
    assert result == pytest.approx(HAND_EXPECTED, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_map_at_r_and_precision_at_1_agree_with_pytorch_metric_learning(seed: int) -> None:
    embeddings, labels = _random_data(seed, num_items=200, dim=16, num_classes=8)
    calculator = AccuracyCalculator(
        include=("mean_average_precision_at_r", "precision_at_1"), device=torch.device("cpu")
    )
    # Its default kNN is Faiss IndexFlatL2 with the query itself removed.
    reference = calculator.get_accuracy(torch.from_numpy(embeddings), torch.from_numpy(labels))
    result = retrieval_metrics(embeddings=embeddings, labels=labels, ks=(1,), metric="l2")
    assert result["map@r"] == pytest.approx(reference["mean_average_precision_at_r"], abs=1e-9)
    assert result["recall@1"] == pytest.approx(reference["precision_at_1"], abs=1e-9)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"queries": np.zeros((2, 3)), "gallery": np.zeros((4, 5)), "k": 1}, "dimension 3 but the gallery has 5"),
        ({"queries": np.zeros(3), "gallery": np.zeros((4, 3)), "k": 1}, "2-D array"),
        ({"queries": np.zeros((2, 3)), "gallery": np.zeros((4, 3)), "k": 5}, r"k must lie in \[1, 4\]"),
        ({"queries": np.zeros((4, 3)), "gallery": np.zeros((4, 3)), "k": 4, "exclude_self": True}, r"\[1, 3\]"),
        (
            {"queries": np.zeros((2, 3)), "gallery": np.zeros((4, 3)), "k": 1, "exclude_self": True},
            "exclude_self needs",
        ),
        ({"queries": np.zeros((2, 3)), "gallery": np.zeros((4, 3)), "k": 1, "metric": "cos"}, "'ip' or 'l2'"),
    ],
)
def test_knn_search_rejects_bad_input(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        knn_search(**kwargs)  # type: ignore[arg-type]


def test_metric_errors_name_the_problem() -> None:
    embeddings = np.zeros((4, 2), dtype=np.float32)
    with pytest.raises(ValueError, match=r"labels must have shape \[4\]"):
        recall_at_k(embeddings=embeddings, labels=np.array([0, 1]))
    with pytest.raises(ValueError, match="no query has another item of its class"):
        map_at_r(embeddings=embeddings, labels=np.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"every k must lie in \[1, 3\]"):
        recall_at_k(embeddings=embeddings, labels=np.array([0, 0, 1, 1]), ks=(1, 8))


def test_query_side_vectors_search_the_other_items_embeddings():
    rng = np.random.default_rng(7)
    embeddings = rng.normal(size=(20, 4)).astype(np.float32)
    labels = np.arange(20) % 4
    queries = rng.normal(size=(20, 4)).astype(np.float32)
    result = retrieval_metrics(embeddings=embeddings, labels=labels, ks=(1, 3), queries=queries)
    # Brute force: item i ranks every other item j by <queries[i], embeddings[j]>.
    hits1, hits3 = [], []
    for i in range(20):
        others = sorted((j for j in range(20) if j != i), key=lambda j: -float(queries[i] @ embeddings[j]))
        hits1.append(labels[others[0]] == labels[i])
        hits3.append(any(labels[j] == labels[i] for j in others[:3]))
    assert result["recall@1"] == pytest.approx(np.mean(hits1))
    assert result["recall@3"] == pytest.approx(np.mean(hits3))
    with pytest.raises(ValueError, match="queries must match the embeddings' shape"):
        retrieval_metrics(embeddings=embeddings, labels=labels, queries=queries[:5])

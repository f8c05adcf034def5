"""Landmark-retrieval metrics against hand-computed cases and plain-loop brute-force references.

Tie policy: `rank_database` breaks equal scores by the lower database index. The random
data here is integer-valued with duplicated database vectors, so scores are exact in
float32 and float64 alike and ties are real: the loop reference (sorting by
(score, index)) must then match the ranking exactly, ties included.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pytest

from retrieval.errors import DatasetError
from retrieval.evaluation.landmarks import (
    average_precision,
    compute_map,
    holidays_map,
    landmark_metrics,
    rank_database,
    revisited_map,
    ukbench_ns_score,
)
from retrieval.evaluation.metrics import Metric


@dataclass(frozen=True)
class Truth:
    """Stands in for the data loader's `QueryGroundTruth`: any object with these arrays fits."""

    easy: np.ndarray
    hard: np.ndarray
    junk: np.ndarray


def _truth(easy: Sequence[int] = (), hard: Sequence[int] = (), junk: Sequence[int] = ()) -> Truth:
    return Truth(
        easy=np.array(easy, dtype=np.int64), hard=np.array(hard, dtype=np.int64), junk=np.array(junk, dtype=np.int64)
    )


# ---------------------------------------------------------------- plain-loop references


def _reference_ranking(queries: np.ndarray, database: np.ndarray, metric: Metric) -> list[list[int]]:
    """Every database index per query, best first, ties by index: Python floats and `sorted`."""
    rankings = []
    for query in queries.tolist():
        keyed = []
        for index, item in enumerate(database.tolist()):
            if metric == "ip":
                key = -sum(a * b for a, b in zip(query, item, strict=True))
            else:
                key = sum((a - b) ** 2 for a, b in zip(query, item, strict=True))
            keyed.append((key, index))
        rankings.append([index for _, index in sorted(keyed)])
    return rankings


def _reference_ap_and_precisions(
    ranking: Sequence[int], positives: set[int], junk: set[int], kappas: Sequence[int]
) -> tuple[float, list[float]]:
    """Walk the ranking, skip junk, add a trapezoid per positive; revisitop's precision@k."""
    if not positives:
        return math.nan, [math.nan] * len(kappas)
    kept = [item for item in ranking if item not in junk]
    found, ap = 0, 0.0
    for rank, item in enumerate(kept):
        if item in positives:
            precision_before = found / rank if rank > 0 else 1.0
            found += 1
            precision_after = found / (rank + 1)
            ap += (precision_before + precision_after) / 2 / len(positives)
    last = max(rank + 1 for rank, item in enumerate(kept) if item in positives)
    precisions = []
    for kappa in kappas:
        depth = min(last, kappa)
        precisions.append(sum(1 for item in kept[:depth] if item in positives) / depth)
    return ap, precisions


def _reference_mean(values: list[float]) -> float:
    kept = [value for value in values if not math.isnan(value)]
    return sum(kept) / len(kept) if kept else math.nan


def _reference_revisited(rankings: list[list[int]], truths: Sequence[Truth], kappas: Sequence[int]) -> dict[str, float]:
    results: dict[str, float] = {}
    precision_results: dict[str, float] = {}
    for setup in ("easy", "medium", "hard"):
        aps: list[float] = []
        precisions: list[list[float]] = []
        for ranking, truth in zip(rankings, truths, strict=True):
            easy, hard, junk = set(truth.easy.tolist()), set(truth.hard.tolist()), set(truth.junk.tolist())
            if setup == "easy":
                positives, ignored = easy, junk | hard
            elif setup == "medium":
                positives, ignored = easy | hard, junk
            else:
                positives, ignored = hard, junk | easy
            ap, precision = _reference_ap_and_precisions(ranking, positives, ignored, kappas)
            aps.append(ap)
            precisions.append(precision)
        results[f"mAP_{setup}"] = _reference_mean(aps)
        for column, kappa in enumerate(kappas):
            precision_results[f"mP@{kappa}_{setup}"] = _reference_mean([row[column] for row in precisions])
    return {**results, **precision_results}


def _reference_ns_score(rankings: list[list[int]], truths: Sequence[Truth]) -> float:
    counts = []
    for ranking, truth in zip(rankings, truths, strict=True):
        relevant, junk = set(truth.easy.tolist()), set(truth.junk.tolist())
        top = [item for item in ranking if item not in junk][:4]
        counts.append(float(sum(1 for item in top if item in relevant)))
    return sum(counts) / len(counts)


# ---------------------------------------------------------------- random data with ties


def _tied_vectors(seed: int, *, num_queries: int, num_database: int) -> tuple[np.ndarray, np.ndarray]:
    """Small integer vectors (exact scores), the database drawn with repetition from few distinct rows."""
    rng = np.random.default_rng(seed)
    distinct = rng.integers(-3, 4, size=(num_database // 2, 5))
    database = distinct[rng.integers(0, len(distinct), size=num_database)]
    queries = rng.integers(-3, 4, size=(num_queries, 5))
    return queries.astype(np.float32), database.astype(np.float32)


def _random_truths(seed: int, *, num_queries: int, num_database: int) -> list[Truth]:
    """Disjoint easy/hard/junk lists; query 0 has no positives at all, query 1 no hard ones."""
    rng = np.random.default_rng(seed + 1000)
    truths = []
    for query in range(num_queries):
        role = rng.choice(4, size=num_database, p=[0.15, 0.15, 0.1, 0.6])
        easy, hard, junk = (np.flatnonzero(role == value) for value in range(3))
        if query == 0:
            easy, hard = easy[:0], hard[:0]
        if query == 1:
            hard = hard[:0]
        truths.append(Truth(easy=easy, hard=hard, junk=junk))
    return truths


def _assert_metrics_equal(result: dict[str, float], expected: dict[str, float]) -> None:
    assert list(result) == list(expected)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-12, nan_ok=True), key


# ---------------------------------------------------------------- rank_database


def test_rank_database_hand_computed_with_ties() -> None:
    database = np.array([[1, 0], [0, 1], [1, 0], [2, 0]], dtype=np.float32)
    query = np.array([[1, 0]], dtype=np.float32)
    # Inner products 1, 0, 1, 2: item 3 first, then the tie 0 and 2 in index order, then 1.
    assert rank_database(query, database).tolist() == [[3, 0, 2, 1]]
    # Squared distances 0, 2, 0, 1: the tie 0 and 2 first, then 3, then 1.
    assert rank_database(query, database, metric="l2").tolist() == [[0, 2, 3, 1]]


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_database_matches_loops_exactly_with_ties(seed: int, metric: Metric) -> None:
    queries, database = _tied_vectors(seed, num_queries=9, num_database=40)
    assert len(np.unique(database, axis=0)) < len(database)
    expected = _reference_ranking(queries, database, metric)
    for batch_size in (1, 4, 100):
        ranking = rank_database(queries, database, metric=metric, batch_size=batch_size)
        assert ranking.dtype == np.int64 and ranking.shape == (9, 40)
        assert ranking.tolist() == expected


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_rank_database_orders_continuous_scores(metric: Metric) -> None:
    rng = np.random.default_rng(7)
    queries = rng.normal(size=(6, 8)).astype(np.float32)
    database = rng.normal(size=(50, 8)).astype(np.float32)
    ranking = rank_database(queries, database, metric=metric, batch_size=4)
    for query, row in zip(queries.astype(np.float64), ranking, strict=True):
        scores = database.astype(np.float64)[row] @ query
        if metric == "l2":
            scores = -(((database.astype(np.float64)[row] - query) ** 2).sum(axis=1))
        assert sorted(row.tolist()) == list(range(50))
        # Best first up to float32 rounding of near-ties.
        assert (np.diff(scores) <= 1e-5).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"queries": np.zeros((2, 3)), "database": np.zeros((4, 5))}, "dimension 3 but the database has 5"),
        ({"queries": np.zeros(3), "database": np.zeros((4, 3))}, "2-D array"),
        ({"queries": np.zeros((2, 3)), "database": np.zeros((0, 3))}, "database is empty"),
        ({"queries": np.full((2, 3), np.nan), "database": np.zeros((4, 3))}, "queries contain NaN"),
        ({"queries": np.zeros((2, 3)), "database": np.zeros((4, 3)), "metric": "cos"}, "'ip' or 'l2'"),
        ({"queries": np.zeros((2, 3)), "database": np.zeros((4, 3)), "batch_size": 0}, "batch_size must be at least 1"),
    ],
)
def test_rank_database_rejects_bad_input(kwargs: dict[str, object], message: str) -> None:
    queries, database = kwargs.pop("queries"), kwargs.pop("database")
    with pytest.raises(ValueError, match=message):
        rank_database(queries, database, **kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------- average_precision


@pytest.mark.parametrize(
    ("positions", "num_positives", "expected"),
    [
        # Positives at 0 and 2: (1 + 1)/2 * 1/2 + (1/2 + 2/3)/2 * 1/2 = 1/2 + 7/24 = 19/24.
        ([0, 2], 2, 19 / 24),
        # One of two positives, at position 1: (0/1 + 1/2)/2 * 1/2 = 1/8.
        ([1], 2, 1 / 8),
        # Perfect: every trapezoid has height 1.
        ([0, 1, 2], 3, 1.0),
        # Nothing retrieved.
        ([], 3, 0.0),
        # Single positive last of 4: (0 + 1/4)/2 = 1/8.
        ([3], 1, 1 / 8),
    ],
)
def test_average_precision_hand_computed(positions: list[int], num_positives: int, expected: float) -> None:
    assert average_precision(np.array(positions, dtype=np.int64), num_positives) == pytest.approx(expected, abs=1e-15)


def test_average_precision_matches_loop_on_random_positions() -> None:
    rng = np.random.default_rng(3)
    for _ in range(50):
        positions = np.sort(rng.choice(60, size=rng.integers(1, 15), replace=False))
        num_positives = len(positions) + int(rng.integers(0, 3))
        expected = 0.0
        for found_before, rank in enumerate(positions.tolist()):
            before = found_before / rank if rank else 1.0
            expected += (before + (found_before + 1) / (rank + 1)) / 2 / num_positives
        assert average_precision(positions, num_positives) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("positions", "num_positives", "message"),
    [
        ([2, 1], 2, "strictly increasing"),
        ([1, 1], 2, "strictly increasing"),
        ([-1], 1, "non-negative"),
        ([0], 0, "num_positives must be at least 1"),
        ([0, 1, 2], 2, "3 positive positions but num_positives=2"),
        ([[0, 1]], 2, "1-D"),
    ],
)
def test_average_precision_rejects_bad_input(positions: list[int], num_positives: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        average_precision(np.array(positions), num_positives)


# ---------------------------------------------------------------- compute_map


def test_compute_map_hand_computed_with_junk_and_an_empty_query() -> None:
    ranking = np.array([[4, 2, 0, 1, 3], [0, 1, 2, 3, 4], [3, 1, 0, 2, 4]])
    # Query 0: junk 2 at position 1 goes; positives 0 and 3 move from positions 2, 4 to 1, 3.
    #   AP = (0/1 + 1/2)/2 * 1/2 + (1/3 + 2/4)/2 * 1/2 = 1/8 + 5/24 = 1/3.
    #   Last positive at 1-based 4: P@1 = 0/1, P@5 = P@10 = 2/min(4, k) = 1/2.
    # Query 1: no positives: AP = NaN, left out.
    # Query 2: positives 3, 1 at positions 0, 1: AP = 1, P@1 = 1, P@5 = P@10 = 2/2 = 1.
    result = compute_map(ranking, positives=[[0, 3], [], [1, 3]], junk=[[2], [0], []], kappas=(1, 5, 10))
    assert result.num_evaluated == 2
    np.testing.assert_allclose(result.average_precisions, np.array([1 / 3, np.nan, 1.0]), atol=1e-15)
    np.testing.assert_allclose(result.precision_at, np.array([[0, 0.5, 0.5], [np.nan] * 3, [1, 1, 1]]), atol=1e-15)
    assert result.mean_average_precision == pytest.approx(2 / 3, abs=1e-15)
    assert result.mean_precision_at == pytest.approx({1: 0.5, 5: 0.75, 10: 0.75}, abs=1e-15)


def test_junk_changes_the_score() -> None:
    # Without declaring 2 junk, query 0 above has positives at 2 and 4:
    # (0 + 1/3)/4 + (1/4 + 2/5)/4 = 1/12 + 13/80 = 59/240.
    result = compute_map(np.array([[4, 2, 0, 1, 3]]), positives=[[0, 3]], junk=[[]])
    assert result.mean_average_precision == pytest.approx(59 / 240, abs=1e-15)


def test_compute_map_counts_duplicate_indices_once() -> None:
    once = compute_map(np.array([[4, 2, 0, 1, 3]]), positives=[[0, 3]], junk=[[2]])
    twice = compute_map(np.array([[4, 2, 0, 1, 3]]), positives=[[3, 0, 3]], junk=[[2, 2]])
    assert once.mean_average_precision == twice.mean_average_precision == pytest.approx(1 / 3)


def test_compute_map_with_no_positives_anywhere_is_nan_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="retrieval.evaluation.landmarks"):
        result = compute_map(np.array([[0, 1, 2], [2, 1, 0]]), positives=[[], []], junk=[[0], []], kappas=(1, 5))
    assert math.isnan(result.mean_average_precision) and result.num_evaluated == 0
    assert all(math.isnan(value) for value in result.mean_precision_at.values())
    assert np.isnan(result.average_precisions).all()
    assert "none of the 2 queries has a positive image" in caplog.text


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compute_map_matches_loops_on_random_rankings(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ranking = np.stack([rng.permutation(30) for _ in range(12)])
    positives, junk = [], []
    for query in range(12):
        role = rng.choice(3, size=30, p=[0.2, 0.2, 0.6])
        positives.append(np.flatnonzero(role == 0) if query != 5 else np.empty(0, dtype=np.int64))
        junk.append(np.flatnonzero(role == 1))
    result = compute_map(ranking, positives, junk, kappas=(1, 3, 10))
    expected_aps, expected_precisions = [], []
    for query in range(12):
        ap, precisions = _reference_ap_and_precisions(
            ranking[query].tolist(), set(positives[query].tolist()), set(junk[query].tolist()), (1, 3, 10)
        )
        expected_aps.append(ap)
        expected_precisions.append(precisions)
    np.testing.assert_allclose(result.average_precisions, expected_aps, atol=1e-12)
    np.testing.assert_allclose(result.precision_at, expected_precisions, atol=1e-12)
    assert result.mean_average_precision == pytest.approx(_reference_mean(expected_aps), abs=1e-12)
    assert result.num_evaluated == 11
    assert 0.05 < result.mean_average_precision < 0.95


@pytest.mark.parametrize(
    ("ranking", "positives", "junk", "message"),
    [
        ([[0, 1, 1]], [[0]], [[]], "row 0 repeats a database index"),
        ([[0, 1, 3]], [[0]], [[]], r"indices outside \[0, 2\]"),
        ([0, 1, 2], [[0]], [[]], "2-D array"),
        ([[0, 1, 2]], [[0], [1]], [[], []], "1 queries but got 2 positive lists"),
        ([[0, 1, 2]], [[5]], [[]], "positives of query 0 holds indices outside the database of 3 items: \\[5\\]"),
        ([[0, 1, 2]], [[0, 1]], [[1]], r"query 0: database items \[1\] are both positive and junk"),
    ],
)
def test_compute_map_rejects_bad_input(
    ranking: list[list[int]], positives: list[list[int]], junk: list[list[int]], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        compute_map(np.array(ranking), positives, junk)


def test_compute_map_rejects_a_bad_kappa() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        compute_map(np.array([[0, 1]]), [[0]], [[]], kappas=(0,))


# ---------------------------------------------------------------- revisited


def test_revisited_hand_computed() -> None:
    truths = [_truth(easy=[0], hard=[1], junk=[2]), _truth(easy=[3])]
    ranking = np.array([[1, 2, 3, 0, 4, 5], [3, 0, 1, 2, 4, 5]])
    # Query 0 ranking 1 2 3 0 4 5:
    #   Easy (pos {0}, junk {1, 2}): 3 0 4 5 -> 0 at 1: AP = (0 + 1/2)/2 = 1/4; P@1 = 0, P@5 = P@10 = 1/2.
    #   Medium (pos {0, 1}, junk {2}): 1 3 0 4 5 -> at 0, 2: AP = 19/24; P@1 = 1, P@5 = P@10 = 2/3.
    #   Hard (pos {1}, junk {0, 2}): 1 3 4 5 -> at 0: AP = 1; P@k = 1.
    # Query 1 (easy {3} ranked first): AP = 1 on Easy and Medium, no hard positives: left out of Hard.
    expected = {
        "mAP_easy": (1 / 4 + 1) / 2,
        "mAP_medium": (19 / 24 + 1) / 2,
        "mAP_hard": 1.0,
        "mP@1_easy": 0.5,
        "mP@5_easy": 0.75,
        "mP@10_easy": 0.75,
        "mP@1_medium": 1.0,
        "mP@5_medium": (2 / 3 + 1) / 2,
        "mP@10_medium": (2 / 3 + 1) / 2,
        "mP@1_hard": 1.0,
        "mP@5_hard": 1.0,
        "mP@10_hard": 1.0,
    }
    _assert_metrics_equal(revisited_map(ranking, truths), expected)


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_revisited_matches_loops_with_ties_and_empty_setups(seed: int, metric: Metric) -> None:
    queries, database = _tied_vectors(seed, num_queries=10, num_database=40)
    truths = _random_truths(seed, num_queries=10, num_database=40)
    expected = _reference_revisited(_reference_ranking(queries, database, metric), truths, (1, 5, 10))
    assert 0.05 < expected["mAP_medium"] < 0.95
    ranking = rank_database(queries, database, metric=metric)
    _assert_metrics_equal(revisited_map(ranking, truths), expected)
    for batch_size in (3, 256):
        streamed = landmark_metrics(
            queries=queries,
            database=database,
            ground_truth=truths,
            protocol="revisited",
            metric=metric,
            batch_size=batch_size,
        )
        _assert_metrics_equal(streamed, expected)


def test_revisited_setup_with_no_positives_is_nan_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    truths = [_truth(easy=[0], junk=[1]), _truth(easy=[2])]
    with caplog.at_level(logging.WARNING, logger="retrieval.evaluation.landmarks"):
        result = revisited_map(np.array([[0, 1, 2], [1, 2, 0]]), truths, kappas=(1,))
    # Easy = Medium: query 0 AP 1, query 1 (2 at position 1) AP (0 + 1/2)/2 = 1/4.
    assert result["mAP_easy"] == result["mAP_medium"] == pytest.approx(5 / 8)
    assert math.isnan(result["mAP_hard"]) and math.isnan(result["mP@1_hard"])
    assert "revisited hard: none of the 2 queries has a positive image" in caplog.text


def test_a_perfect_ranking_scores_one_on_every_setup() -> None:
    truths = [_truth(easy=[0, 1], hard=[2], junk=[3]), _truth(easy=[4], hard=[5, 6])]
    # Medium positives first; in Easy the hard ones are junk, in Hard the easy ones are.
    ranking = np.array([[0, 1, 2, 3, 4, 5, 6], [4, 5, 6, 0, 1, 2, 3]])
    assert set(revisited_map(ranking, truths).values()) == {1.0}


# ---------------------------------------------------------------- holidays


def test_holidays_hand_computed() -> None:
    # Query 0 is database image 0 (junk for itself), relevant 1 and 2; ranking 0 3 1 2 4.
    # Without 0: 3 1 2 4 -> positives at 1, 2: AP = (0 + 1/2)/4 + (1/2 + 2/3)/4 = 1/8 + 7/24 = 5/12.
    # Query 1 is image 3, relevant 4, ranked first after itself: AP = 1.
    truths = [_truth(easy=[1, 2], junk=[0]), _truth(easy=[4], junk=[3])]
    ranking = np.array([[0, 3, 1, 2, 4], [3, 4, 0, 1, 2]])
    assert holidays_map(ranking, truths) == pytest.approx((5 / 12 + 1) / 2, abs=1e-15)


@pytest.mark.parametrize("seed", [0, 1])
def test_holidays_matches_loops_with_ties(seed: int) -> None:
    queries, database = _tied_vectors(seed, num_queries=8, num_database=30)
    truths = _random_truths(seed, num_queries=8, num_database=30)
    aps = [
        _reference_ap_and_precisions(ranking, set(truth.easy.tolist()), set(truth.junk.tolist()), ())[0]
        for ranking, truth in zip(_reference_ranking(queries, database, "ip"), truths, strict=True)
    ]
    expected = _reference_mean(aps)
    assert holidays_map(rank_database(queries, database), truths) == pytest.approx(expected, abs=1e-12)
    result = landmark_metrics(
        queries=queries, database=database, ground_truth=truths, protocol="holidays", batch_size=3
    )
    assert result == {"mAP": pytest.approx(expected, abs=1e-12)}


# ---------------------------------------------------------------- ukbench


def test_ukbench_hand_computed() -> None:
    # Two objects, images 0-3 and 4-7; each query's relevant set is its object's 4 images.
    truths = [_truth(easy=[0, 1, 2, 3]), _truth(easy=[4, 5, 6, 7]), _truth(easy=[0, 1, 2, 3])]
    ranking = np.array(
        [
            [0, 1, 5, 2, 3, 4, 6, 7],  # top 4: 0 1 5 2 -> 3 relevant
            [4, 5, 6, 7, 0, 1, 2, 3],  # top 4 all relevant -> 4
            [7, 6, 5, 4, 3, 2, 1, 0],  # top 4 none relevant -> 0
        ]
    )
    assert ukbench_ns_score(ranking, truths) == pytest.approx(7 / 3, abs=1e-15)


def test_ukbench_skips_junk_before_taking_the_top_4() -> None:
    # Junk 5 goes: top 4 of 0 1 2 3 4 ... is 0 1 2 3 -> 4 (it would be 3 counting 5).
    truths = [_truth(easy=[0, 1, 2, 3], junk=[5])]
    assert ukbench_ns_score(np.array([[0, 1, 5, 2, 3, 4]]), truths) == 4.0


def _ukbench_truths(rng: np.random.Generator, groups: int, *, with_junk: bool) -> list[Truth]:
    """Each image's object is its group of 4; with_junk declares 0-2 images of other groups junk."""
    truths = []
    for image in range(4 * groups):
        easy = list(range(4 * (image // 4), 4 * (image // 4) + 4))
        others = [item for item in range(4 * groups) if item not in easy]
        junk = rng.choice(others, size=rng.integers(0, 3), replace=False).tolist() if with_junk else []
        truths.append(_truth(easy=easy, junk=junk))
    return truths


@pytest.mark.parametrize("with_junk", [False, True])
@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize(("seed", "spread"), [(0, 2), (1, 2), (2, 0)])
def test_ukbench_matches_loops_with_ties(seed: int, spread: int, metric: Metric, with_junk: bool) -> None:
    rng = np.random.default_rng(seed)
    groups = 6
    # Every image is a query. Small integer offsets from a group centre give ties and mistakes;
    # spread 0 with centres in {0, 1}^2 makes whole groups identical and ties cross the top-4 cut.
    centres = rng.integers(-4, 5, size=(groups, 4)) if spread else rng.integers(0, 2, size=(groups, 2))
    offsets = rng.integers(-spread, spread + 1, size=(4 * groups, centres.shape[1]))
    database = (np.repeat(centres, 4, axis=0) + offsets).astype(np.float32)
    truths = _ukbench_truths(rng, groups, with_junk=with_junk)
    expected = _reference_ns_score(_reference_ranking(database, database, metric), truths)
    assert 0.5 < expected < 3.9
    assert ukbench_ns_score(rank_database(database, database, metric=metric), truths) == pytest.approx(expected)
    result = landmark_metrics(
        queries=database, database=database, ground_truth=truths, protocol="ukbench", metric=metric, batch_size=5
    )
    assert result == {"ns_score": pytest.approx(expected)}


def test_ukbench_perfect_embedder_scores_four() -> None:
    rng = np.random.default_rng(0)
    database = (np.repeat(np.eye(5), 4, axis=0) + rng.normal(scale=1e-3, size=(20, 5))).astype(np.float32)
    truths = [_truth(easy=range(4 * (image // 4), 4 * (image // 4) + 4)) for image in range(20)]
    assert landmark_metrics(queries=database, database=database, ground_truth=truths, protocol="ukbench") == {
        "ns_score": 4.0
    }


# ---------------------------------------------------------------- landmark_metrics errors


def test_landmark_metrics_names_both_counts_when_queries_and_ground_truth_differ() -> None:
    with pytest.raises(DatasetError, match="got 3 queries but ground truth for 2 queries"):
        landmark_metrics(
            queries=np.zeros((3, 2)),
            database=np.zeros((5, 2)),
            ground_truth=[_truth(easy=[0]), _truth(easy=[1])],
            protocol="revisited",
        )


@pytest.mark.parametrize(
    ("truth", "message"),
    [
        (_truth(easy=[0, 7]), r"ground truth easy of query 0 holds indices outside the database of 5 items: \[7\]"),
        (_truth(easy=[0], junk=[-1]), r"ground truth junk of query 0 holds indices outside .*\[-1\]"),
        (_truth(easy=[0, 1], hard=[1]), r"database items \[1\] are in both easy and hard"),
        (_truth(easy=[0], hard=[2], junk=[2, 3]), r"database items \[2\] are in both hard and junk"),
    ],
)
@pytest.mark.parametrize("protocol", ["revisited", "holidays", "ukbench"])
def test_landmark_metrics_rejects_bad_ground_truth(truth: Truth, message: str, protocol: str) -> None:
    with pytest.raises(DatasetError, match=message):
        landmark_metrics(
            queries=np.zeros((1, 2)),
            database=np.zeros((5, 2)),
            ground_truth=[truth],
            protocol=protocol,  # type: ignore[arg-type]
        )


def test_precomputed_ranking_functions_check_ground_truth_too() -> None:
    ranking = np.array([[0, 1, 2]])
    with pytest.raises(DatasetError, match="got 1 queries but ground truth for 2 queries"):
        holidays_map(ranking, [_truth(easy=[0]), _truth(easy=[1])])
    with pytest.raises(DatasetError, match=r"outside the database of 3 items: \[3\]"):
        ukbench_ns_score(ranking, [_truth(easy=[3])])


def test_landmark_metrics_rejects_an_unknown_protocol() -> None:
    with pytest.raises(ValueError, match=r"protocol must be one of \['revisited', 'holidays', 'ukbench'\]"):
        landmark_metrics(
            queries=np.zeros((1, 2)),
            database=np.zeros((5, 2)),
            ground_truth=[_truth(easy=[0])],
            protocol="oxford",  # type: ignore[arg-type]
        )

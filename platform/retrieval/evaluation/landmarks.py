"""Landmark-retrieval protocols: revisited Oxford/Paris, INRIA Holidays and UKBench.

Every query ranks the whole database (`rank_database`); the metrics then read the
positions of each query's relevant images in that ranking:

- revisited Oxford5k/Paris6k (Radenović et al., "Revisiting Oxford and Paris", CVPR
  2018): mAP and mean precision@k on the Easy, Medium and Hard setups, junk ignored;
- INRIA Holidays: mAP with the same trapezoidal AP, the query itself declared junk;
- UKBench: the N-S score, the mean number of a query's 4 relevant images in its top 4.

The AP and mAP follow the protocol's reference code (`compute_ap` and `compute_map` in
`python/evaluate.py` of github.com/filipradenovic/revisitop, also
`cirtorch/utils/evaluate.py` of filipradenovic/cnnimageretrieval-pytorch), so numbers
compare with published ones. Scores are fractions in [0, 1] (papers print mAP x 100).

Ground truth is any object with `.easy`, `.hard` and `.junk` arrays of database
indices (`LandmarkGroundTruth`), one per query.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from retrieval.errors import DatasetError
from retrieval.evaluation.metrics import Metric

logger = logging.getLogger(__name__)

LandmarkProtocol = Literal["revisited", "holidays", "ukbench"]
LANDMARK_PROTOCOLS: tuple[LandmarkProtocol, ...] = ("revisited", "holidays", "ukbench")
REVISITED_SETUPS = ("easy", "medium", "hard")
DEFAULT_KAPPAS = (1, 5, 10)
DEFAULT_BATCH_SIZE = 256
# UKBench groups 4 images of one object; the N-S score counts them in the top 4.
UKBENCH_DEPTH = 4


class LandmarkGroundTruth(Protocol):
    """Relevance of the database to one query: three 1-D arrays of database indices.

    `easy` and `hard` are positives of two difficulties, `junk` are images that are
    neither counted as hits nor as misses. The three must be disjoint.
    """

    @property
    def easy(self) -> np.ndarray: ...

    @property
    def hard(self) -> np.ndarray: ...

    @property
    def junk(self) -> np.ndarray: ...


@dataclass(frozen=True)
class MapResult:
    """mAP and mean precision@k of a set of queries, with the per-query values.

    Attributes:
        mean_average_precision: Mean AP over the queries that have positives (NaN if none has).
        average_precisions: AP per query `[Q]`, NaN for a query without positives.
        mean_precision_at: {k: mean precision@k} over the queries that have positives.
        precision_at: Precision@k per query `[Q, len(kappas)]`, NaN rows for queries
            without positives; columns in the order of `kappas`.
        num_evaluated: How many queries have positives and enter the means.
    """

    mean_average_precision: float
    average_precisions: np.ndarray
    mean_precision_at: dict[int, float]
    precision_at: np.ndarray
    num_evaluated: int


def _as_finite_float32_matrix(name: str, array: np.ndarray) -> np.ndarray:
    matrix = np.ascontiguousarray(array, dtype=np.float32)
    if matrix.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, D], got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise ValueError(f"{name} contain NaN or infinite values (or overflow float32)")
    return matrix


def rank_database(
    queries: np.ndarray,
    database: np.ndarray,
    *,
    metric: Metric = "ip",
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> np.ndarray:
    """The full ranking of the database for each query, best first.

    Scores are computed in float32 with a matrix product, `batch_size` queries at a
    time, so the working memory is about `batch_size x N` scores plus the `[Q, N]`
    result. Ties (equal computed scores, e.g. duplicated database vectors) are broken
    by the lower database index: the ranking is deterministic.

    Args:
        queries: Query vectors `[Q, D]`.
        database: Database vectors `[N, D]`, N >= 1.
        metric: "ip" ranks by inner product (descending; cosine similarity for
            L2-normalised vectors), "l2" by squared Euclidean distance (ascending).
        batch_size: Queries scored at once (>= 1).

    Returns:
        `[Q, N]` int64: row q lists every database index once, best first.

    Raises:
        ValueError: Bad shapes, dimension mismatch, non-finite values, bad `metric` or
            `batch_size`.

    >>> database = np.array([[1, 0], [0, 1], [1, 0], [2, 0]], dtype=np.float32)
    >>> rank_database(np.array([[1.0, 0.0]]), database).tolist()
    [[3, 0, 2, 1]]
    >>> rank_database(np.array([[1.0, 0.0]]), database, metric="l2").tolist()
    [[0, 2, 3, 1]]
    """
    query_matrix, database_matrix = _validated_search_inputs(queries, database, metric=metric, batch_size=batch_size)
    ranking = np.empty((query_matrix.shape[0], database_matrix.shape[0]), dtype=np.int64)
    for start, rows in _ranked_batches(query_matrix, database_matrix, metric=metric, batch_size=batch_size):
        ranking[start : start + len(rows)] = rows
    return ranking


def _validated_search_inputs(
    queries: np.ndarray, database: np.ndarray, *, metric: Metric, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    query_matrix = _as_finite_float32_matrix("queries", queries)
    database_matrix = _as_finite_float32_matrix("database", database)
    if query_matrix.shape[1] != database_matrix.shape[1]:
        raise ValueError(
            f"queries have dimension {query_matrix.shape[1]} but the database has {database_matrix.shape[1]}"
        )
    if database_matrix.shape[0] == 0:
        raise ValueError("the database is empty: there is nothing to rank")
    if metric not in ("ip", "l2"):
        raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return query_matrix, database_matrix


def _ranked_batches(
    queries: np.ndarray, database: np.ndarray, *, metric: Metric, batch_size: int, depth: int | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """(first query, rankings `[B, depth]` int64) per batch of validated inputs; `depth=None` ranks all N.

    The first `depth` columns equal those of the full ranking, ties included.
    """
    # For l2 the query norm is constant along a row, so ||d||^2 - 2 q.d orders like the distance.
    database_norms = (database * database).sum(axis=1)
    for start in range(0, queries.shape[0], batch_size):
        products = queries[start : start + batch_size] @ database.T
        # Ascending sort key; a stable sort keeps equal keys in database order, so the lower index wins a tie.
        sort_key = -products if metric == "ip" else database_norms[None, :] - 2 * products
        if depth is None or depth >= database.shape[0]:
            yield start, np.argsort(sort_key, axis=1, kind="stable")
        else:
            yield start, _top_of_stable_order(sort_key, depth)


def _top_of_stable_order(sort_key: np.ndarray, depth: int) -> np.ndarray:
    """The first `depth` columns of `argsort(sort_key, kind="stable")` `[B, depth]`, in O(N) per row."""
    # Every item of the top `depth` has a key <= the depth-th smallest; sorting just those
    # (kept in index order, stably) reproduces the full order's head, ties across the cut included.
    thresholds = np.partition(sort_key, depth - 1, axis=1)[:, depth - 1]
    top = np.empty((len(sort_key), depth), dtype=np.int64)
    for row, (row_key, threshold) in enumerate(zip(sort_key, thresholds, strict=True)):
        candidates = np.flatnonzero(row_key <= threshold)
        top[row] = candidates[np.argsort(row_key[candidates], kind="stable")[:depth]]
    return top


def average_precision(positive_positions: np.ndarray | Sequence[int], num_positives: int) -> float:
    """Average precision of one query, the trapezoidal rule of the revisited protocol.

    Exactly `compute_ap(ranks, nres)` of filipradenovic/revisitop (`python/evaluate.py`;
    the same function is in cnnimageretrieval-pytorch, `cirtorch/utils/evaluate.py`, and
    it is the Holidays package's `score_ap_from_ranks_1`). For the positive at 0-based
    position r (junk already removed) with i positives before it,

        precision_0 = i / r   (1 when r == 0),   precision_1 = (i + 1) / (r + 1),
        AP = sum over positives of (precision_0 + precision_1) / 2 * (1 / num_positives),

    the area under the precision-recall curve by trapezoids of width 1 / num_positives.
    Positives that were not retrieved (fewer positions than `num_positives`) add nothing.

    Args:
        positive_positions: 0-based positions of the retrieved positives `[P]`, strictly increasing.
        num_positives: The query's number of positives, >= max(1, P).

    Returns:
        The AP, in [0, 1].

    Raises:
        ValueError: Positions not 1-D, negative or not strictly increasing; `num_positives`
            below 1 or below the number of positions.

    >>> average_precision([0, 2], 2)  # 1/2 * (1 + 1) / 2 + 1/2 * (1/2 + 2/3) / 2 = 19/24
    0.7916666666666666
    """
    positions = np.asarray(positive_positions)
    if positions.ndim != 1:
        raise ValueError(f"positive_positions must be a 1-D array [P], got shape {positions.shape}")
    if positions.size and not np.issubdtype(positions.dtype, np.integer):
        raise ValueError(f"positive_positions must be integers, got dtype {positions.dtype}")
    if num_positives < 1:
        raise ValueError(f"num_positives must be at least 1 (AP is undefined without positives), got {num_positives}")
    if len(positions) > num_positives:
        raise ValueError(f"got {len(positions)} positive positions but num_positives={num_positives}")
    if len(positions) == 0:
        return 0.0
    if positions[0] < 0 or (np.diff(positions) <= 0).any():
        raise ValueError(f"positive_positions must be non-negative and strictly increasing, got {positions.tolist()}")
    ranks = positions.astype(np.float64)
    found_before = np.arange(len(ranks), dtype=np.float64)
    precision_0 = np.divide(found_before, ranks, out=np.ones_like(ranks), where=ranks > 0)
    precision_1 = (found_before + 1) / (ranks + 1)
    return float(((precision_0 + precision_1) / 2).sum() / num_positives)


def _validated_ranking(ranking: np.ndarray) -> np.ndarray:
    """A `[Q, N]` int64 ranking whose every row is a permutation of `0..N-1`."""
    ranks = np.asarray(ranking)
    if ranks.ndim != 2:
        raise ValueError(f"ranking must be a 2-D array [Q, N], got shape {ranks.shape}")
    if ranks.size and not np.issubdtype(ranks.dtype, np.integer):
        raise ValueError(f"ranking must hold integer database indices, got dtype {ranks.dtype}")
    ranks = ranks.astype(np.int64, copy=False)
    num_database = ranks.shape[1]
    if ranks.size and (ranks.min() < 0 or ranks.max() >= num_database):
        raise ValueError(
            f"ranking holds indices outside [0, {num_database - 1}] (min {ranks.min()}, max {ranks.max()}): "
            "it must rank the full database, one column per database item"
        )
    # N in-range entries that cover all N indices: each row is a permutation.
    seen = np.zeros(ranks.shape, dtype=bool)
    np.put_along_axis(seen, ranks, True, axis=1)
    incomplete = np.flatnonzero(~seen.all(axis=1))
    if len(incomplete):
        raise ValueError(
            f"ranking row {int(incomplete[0])} repeats a database index: every row must rank each of the "
            f"{num_database} database items exactly once ({len(incomplete)} bad rows)"
        )
    return ranks


def _positions_in(ranking: np.ndarray) -> np.ndarray:
    """Inverse permutation per row: where each database item sits in the query's ranking `[Q, N]`."""
    positions = np.empty_like(ranking)
    np.put_along_axis(positions, ranking, np.arange(ranking.shape[1], dtype=np.int64)[None, :], axis=1)
    return positions


def _check_kappas(kappas: Sequence[int]) -> list[int]:
    chosen = [int(kappa) for kappa in kappas]
    if any(kappa < 1 for kappa in chosen):
        raise ValueError(f"every k of precision@k must be at least 1, got kappas={list(kappas)}")
    return chosen


def _as_index_array(values: np.ndarray | Sequence[int], *, what: str, num_database: int) -> np.ndarray:
    """Distinct database indices as a sorted int64 array; `what` names the list in errors."""
    array = np.asarray(values)
    if array.size == 0:
        return np.empty(0, dtype=np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"{what} must be a 1-D integer array of database indices, got shape {array.shape}, dtype {array.dtype}"
        )
    if array.min() < 0 or array.max() >= num_database:
        outside = array[(array < 0) | (array >= num_database)]
        raise ValueError(
            f"{what} holds indices outside the database of {num_database} items: {sorted(outside.tolist())[:10]}"
        )
    return np.unique(array.astype(np.int64))


def _per_query_scores(
    ranking: np.ndarray, positives: Sequence[np.ndarray], junk: Sequence[np.ndarray], kappas: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """AP `[Q]` and precision@k `[Q, K]` per query from validated inputs (sorted unique indices)."""
    average_precisions = np.full(len(ranking), np.nan)
    precision_at = np.full((len(ranking), len(kappas)), np.nan)
    positions = _positions_in(ranking)
    for query in range(len(ranking)):
        if len(positives[query]) == 0:
            continue
        positive_positions = np.sort(positions[query, positives[query]])
        junk_positions = np.sort(positions[query, junk[query]])
        # Removing junk from the ranking moves each positive up by the junk ranked before it.
        positive_positions -= np.searchsorted(junk_positions, positive_positions)
        average_precisions[query] = average_precision(positive_positions, len(positives[query]))
        # revisitop's precision@k: k is capped at the last positive's 1-based position, so a
        # query whose positives all lie within the top k is not penalised for having fewer than k.
        last_position = int(positive_positions[-1]) + 1
        for column, kappa in enumerate(kappas):
            depth = min(last_position, kappa)
            precision_at[query, column] = np.count_nonzero(positive_positions < depth) / depth
    return average_precisions, precision_at


def _summarise(average_precisions: np.ndarray, precision_at: np.ndarray, kappas: list[int], *, what: str) -> MapResult:
    evaluated = ~np.isnan(average_precisions)
    num_evaluated = int(evaluated.sum())
    if num_evaluated == 0:
        logger.warning("%s: none of the %d queries has a positive image, so mAP is NaN", what, len(evaluated))
        return MapResult(
            mean_average_precision=float("nan"),
            average_precisions=average_precisions,
            mean_precision_at={kappa: float("nan") for kappa in kappas},
            precision_at=precision_at,
            num_evaluated=0,
        )
    if num_evaluated < len(evaluated):
        logger.info(
            "%s: %d of %d queries have no positive image and are left out",
            what,
            len(evaluated) - num_evaluated,
            len(evaluated),
        )
    return MapResult(
        mean_average_precision=float(average_precisions[evaluated].mean()),
        average_precisions=average_precisions,
        mean_precision_at={kappa: float(precision_at[evaluated, column].mean()) for column, kappa in enumerate(kappas)},
        precision_at=precision_at,
        num_evaluated=num_evaluated,
    )


def compute_map(
    ranking: np.ndarray,
    positives: Sequence[np.ndarray | Sequence[int]],
    junk: Sequence[np.ndarray | Sequence[int]],
    kappas: Sequence[int] = DEFAULT_KAPPAS,
) -> MapResult:
    """mAP and mean precision@k with junk images ignored, as revisitop's `compute_map`.

    For each query, the junk images are removed from its ranking, the positives'
    positions are read in what is left, and `average_precision` scores them. A query
    without positives gets AP = NaN and is left out of the means (revisitop's `nempty`);
    when no query has positives the means are NaN and a warning is logged.

    Precision@k follows revisitop too: with p the 1-based position (junk removed) of the
    query's last positive, precision@k = (positives within the first min(p, k)) / min(p, k).

    Duplicate indices within a list count once.

    Args:
        ranking: Full rankings `[Q, N]`, best first; each row a permutation of the N
            database indices (as `rank_database` returns).
        positives: Per query, the database indices of its positives (Q arrays).
        junk: Per query, the database indices to ignore (Q arrays), disjoint from its positives.
        kappas: The k of precision@k, each >= 1.

    Returns:
        A `MapResult`.

    Raises:
        ValueError: A ranking row that is not a permutation, list counts that differ from
            Q, indices outside the database, a positive that is also junk, or a k below 1.

    >>> ranking = np.array([[4, 2, 0, 1, 3]])
    >>> result = compute_map(ranking, positives=[np.array([0, 3])], junk=[np.array([2])], kappas=(1, 5))
    >>> round(result.mean_average_precision, 6), result.mean_precision_at  # positions 1, 3 once 2 is gone
    (0.333333, {1: 0.0, 5: 0.5})
    """
    ranks = _validated_ranking(ranking)
    chosen = _check_kappas(kappas)
    num_queries, num_database = ranks.shape
    if len(positives) != num_queries or len(junk) != num_queries:
        raise ValueError(
            f"ranking has {num_queries} queries but got {len(positives)} positive lists and {len(junk)} junk lists"
        )
    positive_lists, junk_lists = [], []
    for query in range(num_queries):
        query_positives = _as_index_array(
            positives[query], what=f"positives of query {query}", num_database=num_database
        )
        query_junk = _as_index_array(junk[query], what=f"junk of query {query}", num_database=num_database)
        both = np.intersect1d(query_positives, query_junk)
        if len(both):
            raise ValueError(f"query {query}: database items {both.tolist()[:10]} are both positive and junk")
        positive_lists.append(query_positives)
        junk_lists.append(query_junk)
    average_precisions, precision_at = _per_query_scores(ranks, positive_lists, junk_lists, chosen)
    return _summarise(average_precisions, precision_at, chosen, what="mAP")


@dataclass(frozen=True)
class _QueryLists:
    """One query's ground truth as sorted, distinct, disjoint int64 index arrays."""

    easy: np.ndarray
    hard: np.ndarray
    junk: np.ndarray


def _validated_ground_truth(
    ground_truth: Sequence[LandmarkGroundTruth], *, num_queries: int, num_database: int
) -> list[_QueryLists]:
    if len(ground_truth) != num_queries:
        raise DatasetError(
            f"got {num_queries} queries but ground truth for {len(ground_truth)} queries: "
            "they must match one to one, in the same order"
        )
    lists = []
    for query, entry in enumerate(ground_truth):
        arrays = {}
        for name in ("easy", "hard", "junk"):
            try:
                arrays[name] = _as_index_array(
                    getattr(entry, name), what=f"ground truth {name} of query {query}", num_database=num_database
                )
            except ValueError as error:
                raise DatasetError(str(error)) from error
        for first, second in (("easy", "hard"), ("easy", "junk"), ("hard", "junk")):
            if len(arrays[first]) == 0 or len(arrays[second]) == 0:
                continue
            both = np.intersect1d(arrays[first], arrays[second])
            if len(both):
                raise DatasetError(
                    f"ground truth of query {query}: database items {both.tolist()[:10]} are in both "
                    f"{first} and {second}; the lists must be disjoint"
                )
        lists.append(_QueryLists(easy=arrays["easy"], hard=arrays["hard"], junk=arrays["junk"]))
    return lists


def _revisited_setups(lists: Sequence[_QueryLists]) -> dict[str, tuple[list[np.ndarray], list[np.ndarray]]]:
    """(positives, junk) per setup of the revisited protocol (Radenović et al. 2018, sec. 4)."""
    return {
        "easy": ([entry.easy for entry in lists], [np.union1d(entry.junk, entry.hard) for entry in lists]),
        "medium": ([np.union1d(entry.easy, entry.hard) for entry in lists], [entry.junk for entry in lists]),
        "hard": ([entry.hard for entry in lists], [np.union1d(entry.junk, entry.easy) for entry in lists]),
    }


def _revisited_from_scores(per_setup: dict[str, tuple[np.ndarray, np.ndarray]], kappas: list[int]) -> dict[str, float]:
    results: dict[str, float] = {}
    summaries = {
        setup: _summarise(aps, precisions, kappas, what=f"revisited {setup}")
        for setup, (aps, precisions) in per_setup.items()
    }
    for setup, summary in summaries.items():
        results[f"mAP_{setup}"] = summary.mean_average_precision
    for setup, summary in summaries.items():
        for kappa, value in summary.mean_precision_at.items():
            results[f"mP@{kappa}_{setup}"] = value
    return results


def _revisited_per_query(
    ranking: np.ndarray, lists: Sequence[_QueryLists], kappas: list[int]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {
        setup: _per_query_scores(ranking, positives, junk, kappas)
        for setup, (positives, junk) in _revisited_setups(lists).items()
    }


def revisited_map(
    ranking: np.ndarray,
    ground_truth: Sequence[LandmarkGroundTruth],
    *,
    kappas: Sequence[int] = DEFAULT_KAPPAS,
) -> dict[str, float]:
    """mAP and mean precision@k on the Easy, Medium and Hard setups of revisited Oxford/Paris.

    Radenović et al., "Revisiting Oxford and Paris" (CVPR 2018): Easy counts the easy
    images as positives and ignores hard and junk; Medium counts easy and hard, ignores
    junk; Hard counts the hard images, ignores easy and junk. Each setup is `compute_map`;
    a query without positives in a setup (typically Hard) is left out of that setup's means.

    Args:
        ranking: Full rankings `[Q, N]`, best first (see `compute_map`).
        ground_truth: One `LandmarkGroundTruth` per query, in ranking order.
        kappas: The k of precision@k (revisitop uses 1, 5, 10).

    Returns:
        {"mAP_easy", "mAP_medium", "mAP_hard", then "mP@{k}_{setup}" for each setup and k},
        each in [0, 1], NaN for a setup where no query has positives.

    Raises:
        ValueError: A bad ranking (see `compute_map`) or a k below 1.
        DatasetError: Ground truth for a different number of queries, indices outside the
            database, or overlapping easy/hard/junk lists.
    """
    ranks = _validated_ranking(ranking)
    chosen = _check_kappas(kappas)
    lists = _validated_ground_truth(ground_truth, num_queries=ranks.shape[0], num_database=ranks.shape[1])
    return _revisited_from_scores(_revisited_per_query(ranks, lists, chosen), chosen)


def holidays_map(ranking: np.ndarray, ground_truth: Sequence[LandmarkGroundTruth]) -> float:
    """mAP of INRIA Holidays: positives are `easy`, `junk` is ignored.

    Holidays queries are database images; the loader declares each query junk for
    itself, so it neither helps nor hurts its own AP. `hard` is not used.

    Args:
        ranking: Full rankings `[Q, N]`, best first (see `compute_map`).
        ground_truth: One `LandmarkGroundTruth` per query, in ranking order.

    Returns:
        The mAP in [0, 1] over the queries with positives (NaN, with a warning, if none).

    Raises:
        ValueError: A bad ranking (see `compute_map`).
        DatasetError: As in `revisited_map`.
    """
    ranks = _validated_ranking(ranking)
    lists = _validated_ground_truth(ground_truth, num_queries=ranks.shape[0], num_database=ranks.shape[1])
    average_precisions, precision_at = _per_query_scores(
        ranks, [entry.easy for entry in lists], [entry.junk for entry in lists], []
    )
    return _summarise(average_precisions, precision_at, [], what="holidays").mean_average_precision


def _ukbench_hits(ranking: np.ndarray, lists: Sequence[_QueryLists]) -> np.ndarray:
    """Relevant images in the top 4 per query `[Q]` float, NaN for a query without relevant images.

    `ranking` `[Q, M]` may be the head of the full ranking, with M >= 4 + the query's junk count.
    """
    hits = np.full(len(ranking), np.nan)
    for query, entry in enumerate(lists):
        if len(entry.easy) == 0:
            continue
        # Junk is skipped (UKBench has none) so the top 4 are the first 4 non-junk images.
        kept = ranking[query][~np.isin(ranking[query], entry.junk)]
        hits[query] = np.count_nonzero(np.isin(kept[:UKBENCH_DEPTH], entry.easy))
    return hits


def _mean_hits(hits: np.ndarray) -> float:
    evaluated = ~np.isnan(hits)
    if not evaluated.any():
        logger.warning("ukbench: none of the %d queries has a relevant image, so the N-S score is NaN", len(hits))
        return float("nan")
    return float(hits[evaluated].mean())


def ukbench_ns_score(ranking: np.ndarray, ground_truth: Sequence[LandmarkGroundTruth]) -> float:
    """N-S score of UKBench (Nistér and Stewénius, CVPR 2006).

    The mean over queries of how many of the query's relevant images (`easy`: its
    object's 4 images, the query itself included) appear in its top 4. Junk images, if
    any are declared, are skipped first; a query without relevant images is left out.

    Args:
        ranking: Full rankings `[Q, N]`, best first (see `compute_map`).
        ground_truth: One `LandmarkGroundTruth` per query, in ranking order.

    Returns:
        The score, in [0, 4] (NaN, with a warning, if no query has relevant images).

    Raises:
        ValueError: A bad ranking (see `compute_map`).
        DatasetError: As in `revisited_map`.

    >>> class Truth:
    ...     easy, hard, junk = np.array([0, 1, 2, 3]), np.array([], dtype=np.int64), np.array([], dtype=np.int64)
    >>> ukbench_ns_score(np.array([[0, 1, 5, 2, 3, 4]]), [Truth()])
    3.0
    """
    ranks = _validated_ranking(ranking)
    lists = _validated_ground_truth(ground_truth, num_queries=ranks.shape[0], num_database=ranks.shape[1])
    return _mean_hits(_ukbench_hits(ranks, lists))


def landmark_metrics(
    *,
    queries: np.ndarray,
    database: np.ndarray,
    ground_truth: Sequence[LandmarkGroundTruth],
    protocol: LandmarkProtocol,
    metric: Metric = "ip",
    kappas: Sequence[int] = DEFAULT_KAPPAS,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> dict[str, float]:
    """Rank the database for every query and score the ranking on a landmark protocol.

    Streams the queries `batch_size` at a time (`rank_database`), so memory stays about
    `batch_size x N` even for UKBench, where every one of the 10,200 images is a query.

    Args:
        queries: Query descriptors `[Q, D]`.
        database: Database descriptors `[N, D]`.
        ground_truth: One `LandmarkGroundTruth` per query (Q of them), indices into `database`.
        protocol: "revisited" (`revisited_map`), "holidays" (`holidays_map`) or
            "ukbench" (`ukbench_ns_score`).
        metric: "ip" or "l2", as in `rank_database`.
        kappas: The k of mean precision@k, for "revisited" only.
        batch_size: Queries ranked at once.

    Returns:
        "revisited": the dict of `revisited_map`; "holidays": {"mAP": ...};
        "ukbench": {"ns_score": ...}.

    Raises:
        ValueError: Bad protocol, shapes, metric, kappas or batch_size.
        DatasetError: Ground truth for a different number of queries than `queries`,
            indices outside the database, or overlapping easy/hard/junk lists.
    """
    if protocol not in LANDMARK_PROTOCOLS:
        raise ValueError(f"protocol must be one of {list(LANDMARK_PROTOCOLS)}, got {protocol!r}")
    query_matrix, database_matrix = _validated_search_inputs(queries, database, metric=metric, batch_size=batch_size)
    chosen = _check_kappas(kappas)
    lists = _validated_ground_truth(
        ground_truth, num_queries=query_matrix.shape[0], num_database=database_matrix.shape[0]
    )
    # UKBench reads only the top 4 non-junk images, so a partial sort suffices there.
    depth = UKBENCH_DEPTH + max((len(entry.junk) for entry in lists), default=0) if protocol == "ukbench" else None
    parts: list[dict[str, tuple[np.ndarray, np.ndarray]]] = []
    hit_parts: list[np.ndarray] = []
    for start, ranking in _ranked_batches(
        query_matrix, database_matrix, metric=metric, batch_size=batch_size, depth=depth
    ):
        batch_lists = lists[start : start + len(ranking)]
        if protocol == "revisited":
            parts.append(_revisited_per_query(ranking, batch_lists, chosen))
        elif protocol == "holidays":
            scores = _per_query_scores(
                ranking, [entry.easy for entry in batch_lists], [entry.junk for entry in batch_lists], []
            )
            parts.append({"holidays": scores})
        else:
            hit_parts.append(_ukbench_hits(ranking, batch_lists))
    if protocol == "ukbench":
        return {"ns_score": _mean_hits(np.concatenate(hit_parts) if hit_parts else np.empty(0))}
    setups = REVISITED_SETUPS if protocol == "revisited" else ("holidays",)
    kappa_list = chosen if protocol == "revisited" else []
    per_setup = {
        setup: (
            np.concatenate([part[setup][0] for part in parts]) if parts else np.empty(0),
            np.concatenate([part[setup][1] for part in parts]) if parts else np.empty((0, len(kappa_list))),
        )
        for setup in setups
    }
    if protocol == "revisited":
        return _revisited_from_scores(per_setup, kappa_list)
    aps, precisions = per_setup["holidays"]
    return {"mAP": _summarise(aps, precisions, [], what="holidays").mean_average_precision}

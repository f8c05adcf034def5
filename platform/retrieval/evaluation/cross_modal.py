"""Cross-modal retrieval metrics: Hamming ranking for hash codes (ch. 3) and Recall@K for real vectors (ch. 4).

Pure functions on numpy arrays. Hash codes are packed to bits (`pack_codes`) and ranked by
Hamming distance with Faiss's exact binary index; every ranking here breaks distance ties by
ascending retrieval index, so each metric is a deterministic function of the codes.

Conventions (those of the DCMH evaluation code, which the cross-modal hashing papers report):

- Relevant means "shares at least one label": labels are multi-hot `[N, C]` and a query and an item
  are relevant when their label vectors have a positive inner product.
- mAP: a query with no relevant item in the ranked list it is scored on counts as AP 0 and is
  counted in the mean (DCMH skips it in the sum but divides by the number of all queries).
- Sizes `top_n`, `ns`, `ks` beyond the retrieval set are errors, not silently clipped.

Memory: rankings are computed per query batch against the whole retrieval set (about
24 bytes per query x item in a batch); the metric functions pick batches of at most
`2**23` query x item pairs, so 2,000 x 18,000 (MIRFlickr) or 5,000 x 25,000 (COCO 5k) stay small.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import faiss
import numpy as np

from retrieval.models.codes import pack_codes

logger = logging.getLogger(__name__)

# Upper bound on query x item pairs held at once by the metric functions (the ranking of one batch).
_PAIRS_PER_BATCH = 2**23


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")


def _packed_codes(name: str, codes: np.ndarray) -> np.ndarray:
    array = np.asarray(codes)
    if array.dtype != np.uint8:
        raise ValueError(
            f"{name} must be packed uint8 codes [N, K/8] from pack_codes, got dtype {array.dtype} shape {array.shape}"
        )
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array of packed codes [N, K/8], got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {array.shape}): need at least one code of at least one byte")
    return np.ascontiguousarray(array)


def _matching_packed(query_codes: np.ndarray, retrieval_codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    queries = _packed_codes("query_codes", query_codes)
    retrieval = _packed_codes("retrieval_codes", retrieval_codes)
    if queries.shape[1] != retrieval.shape[1]:
        raise ValueError(
            f"query_codes have {queries.shape[1]} bytes ({8 * queries.shape[1]} bits, shape {queries.shape}) but "
            f"retrieval_codes have {retrieval.shape[1]} ({8 * retrieval.shape[1]} bits, shape {retrieval.shape})"
        )
    return queries, retrieval


def _labels(name: str, labels: np.ndarray, *, num_items: int, codes_name: str) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 2:
        raise ValueError(
            f"{name} must be multi-hot labels [N, C] (one-hot for single-label data), got shape {array.shape}"
        )
    if array.shape[0] != num_items:
        raise ValueError(f"{name} has {array.shape[0]} rows (shape {array.shape}) but {codes_name} has {num_items}")
    return (array > 0).astype(np.float32)


def _label_pair(
    query_labels: np.ndarray, retrieval_labels: np.ndarray, *, num_queries: int, num_items: int
) -> tuple[np.ndarray, np.ndarray]:
    queries = _labels("query_labels", query_labels, num_items=num_queries, codes_name="query_codes")
    retrieval = _labels("retrieval_labels", retrieval_labels, num_items=num_items, codes_name="retrieval_codes")
    if queries.shape[1] != retrieval.shape[1]:
        raise ValueError(
            f"query_labels have {queries.shape[1]} classes (shape {queries.shape}) but retrieval_labels have "
            f"{retrieval.shape[1]} (shape {retrieval.shape})"
        )
    return queries, retrieval


def _check_size(name: str, value: int, *, num_items: int) -> None:
    if not 1 <= value <= num_items:
        raise ValueError(f"{name} must lie in [1, {num_items}] for a retrieval set of {num_items} items, got {value}")


def _ranked_batches(
    queries: np.ndarray, retrieval: np.ndarray, *, count: int, batch_size: int
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield `(first query, distances [B, count] int32, indices [B, count] int64)` per query batch.

    Faiss returns every item of a batch (a range search with radius K + 1, so all distances are
    within it); the distances are scattered into a `[B, N]` matrix and ranked with a stable sort,
    which puts equal distances in ascending index order whatever order Faiss returns them in.
    Distances are at most K, so they fit 16 bits and numpy's stable sort is a radix sort.
    """
    num_items, num_bits = retrieval.shape[0], 8 * retrieval.shape[1]
    index = faiss.IndexBinaryFlat(num_bits)
    index.add(retrieval)
    distance_type = np.min_scalar_type(num_bits)
    for start in range(0, queries.shape[0], batch_size):
        batch = queries[start : start + batch_size]
        limits, found_distances, found_indices = index.range_search(batch, num_bits + 1)
        if int(limits[-1]) != len(batch) * num_items:
            raise RuntimeError(
                f"Faiss range search returned {int(limits[-1])} of {len(batch) * num_items} query x item distances"
            )
        rows = np.repeat(np.arange(len(batch)), np.diff(limits).astype(np.int64))
        distances = np.empty((len(batch), num_items), dtype=distance_type)
        distances[rows, found_indices] = found_distances
        order = np.argsort(distances, axis=1, kind="stable")[:, :count]
        yield start, np.take_along_axis(distances, order, axis=1).astype(np.int32), order.astype(np.int64)


def _metric_batch_size(num_items: int) -> int:
    return max(1, min(1024, _PAIRS_PER_BATCH // num_items))


def hamming_ranking(
    query_codes: np.ndarray, retrieval_codes: np.ndarray, *, top_n: int | None = None, batch_size: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Rank the retrieval set by Hamming distance for every query (Faiss `IndexBinaryFlat`).

    Ties (equal distance) are ordered by ascending retrieval index, always. Each batch of
    queries is searched against the whole retrieval set, which holds about
    `24 * batch_size * N` bytes at once.

    Args:
        query_codes: Packed query codes `[Q, K/8]` uint8 (from `pack_codes`).
        retrieval_codes: Packed retrieval codes `[N, K/8]` uint8.
        top_n: Keep the first `top_n` of each ranking (in `[1, N]`); None keeps all `N`.
        batch_size: Queries searched at once.

    Returns:
        `(distances [Q, n] int32, indices [Q, n] int64)`, nearest first, `n = top_n or N`.

    Raises:
        ValueError: Codes not packed uint8 2-D, empty, of different widths; `top_n` or
            `batch_size` out of range.

    >>> codes = pack_codes(np.array([[1.0] * 8, [-1.0] * 8, [1.0] * 8]))
    >>> hamming_ranking(codes[:1], codes)[1].tolist()
    [[0, 2, 1]]
    """
    queries, retrieval = _matching_packed(query_codes, retrieval_codes)
    _check_batch_size(batch_size)
    num_items = retrieval.shape[0]
    count = num_items if top_n is None else top_n
    _check_size("top_n", count, num_items=num_items)
    distances = np.empty((queries.shape[0], count), dtype=np.int32)
    indices = np.empty((queries.shape[0], count), dtype=np.int64)
    for start, batch_distances, batch_indices in _ranked_batches(
        queries, retrieval, count=count, batch_size=batch_size
    ):
        distances[start : start + len(batch_distances)] = batch_distances
        indices[start : start + len(batch_indices)] = batch_indices
    return distances, indices


def _validated(
    query_codes: np.ndarray,
    query_labels: np.ndarray,
    retrieval_codes: np.ndarray,
    retrieval_labels: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Packed codes and 0/1 float32 labels, checked against each other."""
    queries, retrieval = _matching_packed(query_codes, retrieval_codes)
    query_multi_hot, retrieval_multi_hot = _label_pair(
        query_labels, retrieval_labels, num_queries=queries.shape[0], num_items=retrieval.shape[0]
    )
    return queries, query_multi_hot, retrieval, retrieval_multi_hot


def _relevance_batches(
    queries: np.ndarray,
    query_multi_hot: np.ndarray,
    retrieval: np.ndarray,
    retrieval_multi_hot: np.ndarray,
    *,
    count: int,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield `(distances [B, count], relevant [B, count] bool)` in ranking order, per query batch."""
    num_items = retrieval.shape[0]
    for start, distances, indices in _ranked_batches(
        queries, retrieval, count=count, batch_size=_metric_batch_size(num_items)
    ):
        shared = query_multi_hot[start : start + len(indices)] @ retrieval_multi_hot.T
        yield distances, np.take_along_axis(shared, indices, axis=1) > 0


def _average_precision(relevant: np.ndarray) -> np.ndarray:
    """AP per row of a ranked relevance matrix `[B, n]`: mean of P@k over relevant ranks k, 0 with none."""
    hits = np.cumsum(relevant, axis=1, dtype=np.int32)
    inverse_ranks = 1.0 / np.arange(1, relevant.shape[1] + 1, dtype=np.float64)
    precision_sum = np.where(relevant, hits * inverse_ranks, 0.0).sum(axis=1)
    found = hits[:, -1].astype(np.float64)
    return np.divide(precision_sum, found, out=np.zeros_like(precision_sum), where=found > 0)


def hash_map(
    query_codes: np.ndarray,
    query_labels: np.ndarray,
    retrieval_codes: np.ndarray,
    retrieval_labels: np.ndarray,
    *,
    top_n: int | None = None,
) -> float:
    """Mean average precision over the Hamming ranking: mAP@all, or mAP@top-N.

    `AP@N = (1 / R_N) * sum_{k <= N, item k relevant} P@k`, with `R_N` the relevant items within
    the top `N` (the whole ranking for mAP@all). A query with `R_N = 0` counts as AP 0 and is
    counted in the mean (the DCMH convention). Ties are ranked by ascending retrieval index.

    Args:
        query_codes: Packed query codes `[Q, K/8]` uint8.
        query_labels: Multi-hot query labels `[Q, C]`.
        retrieval_codes: Packed retrieval codes `[N, K/8]` uint8.
        retrieval_labels: Multi-hot retrieval labels `[N, C]`.
        top_n: Score the first `top_n` items of each ranking (in `[1, N]`); None scores all.

    Returns:
        mAP in [0, 1].

    Raises:
        ValueError: Bad shapes (see `hamming_ranking`), labels that do not match the codes,
            or `top_n` out of range.
    """
    arrays = _validated(query_codes, query_labels, retrieval_codes, retrieval_labels)
    num_items = arrays[2].shape[0]
    count = num_items if top_n is None else top_n
    _check_size("top_n", count, num_items=num_items)
    total = 0.0
    num_queries = 0
    for _, relevant in _relevance_batches(*arrays, count=count):
        total += float(_average_precision(relevant).sum())
        num_queries += relevant.shape[0]
    return total / num_queries


def precision_at_n(
    query_codes: np.ndarray,
    query_labels: np.ndarray,
    retrieval_codes: np.ndarray,
    retrieval_labels: np.ndarray,
    *,
    ns: Sequence[int],
) -> dict[int, float]:
    """Precision of the first `n` items of the Hamming ranking, averaged over all queries, per `n`.

    Args:
        query_codes: Packed query codes `[Q, K/8]` uint8.
        query_labels: Multi-hot query labels `[Q, C]`.
        retrieval_codes: Packed retrieval codes `[N, K/8]` uint8.
        retrieval_labels: Multi-hot retrieval labels `[N, C]`.
        ns: Cut-offs, each in `[1, N]`.

    Returns:
        `{n: mean P@n}` for every `n` in `ns`.

    Raises:
        ValueError: Bad shapes, empty `ns`, or an `n` out of range.
    """
    arrays = _validated(query_codes, query_labels, retrieval_codes, retrieval_labels)
    cutoffs = [int(n) for n in ns]
    if not cutoffs:
        raise ValueError("ns is empty: give at least one cut-off N for precision@N")
    for cutoff in cutoffs:
        _check_size("every n in ns", cutoff, num_items=arrays[2].shape[0])
    hit_sums = dict.fromkeys(cutoffs, 0.0)
    num_queries = 0
    for _, relevant in _relevance_batches(*arrays, count=max(cutoffs)):
        hits = np.cumsum(relevant, axis=1, dtype=np.int32)
        for cutoff in cutoffs:
            hit_sums[cutoff] += float(hits[:, cutoff - 1].sum()) / cutoff
        num_queries += relevant.shape[0]
    return {cutoff: hit_sums[cutoff] / num_queries for cutoff in cutoffs}


def hamming_pr_curve(
    query_codes: np.ndarray,
    query_labels: np.ndarray,
    retrieval_codes: np.ndarray,
    retrieval_labels: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall of "retrieve every item within Hamming radius r", for r = 0..K.

    Per query and radius, precision = relevant retrieved / retrieved and recall = relevant
    retrieved / relevant in the retrieval set. The curve averages over queries where each is
    defined: precision over the queries that retrieve at least one item at that radius (an empty
    retrieval is skipped, not scored 0 or 1), recall over the queries with at least one relevant
    item. A radius where no query qualifies gives NaN (matplotlib leaves a gap).

    Args:
        query_codes: Packed query codes `[Q, K/8]` uint8.
        query_labels: Multi-hot query labels `[Q, C]`.
        retrieval_codes: Packed retrieval codes `[N, K/8]` uint8.
        retrieval_labels: Multi-hot retrieval labels `[N, C]`.

    Returns:
        `(precision [K + 1], recall [K + 1])` float64, indexed by radius; recall at r = K is 1
        wherever defined.

    Raises:
        ValueError: Bad shapes (see `hash_map`).
    """
    arrays = _validated(query_codes, query_labels, retrieval_codes, retrieval_labels)
    num_items = arrays[2].shape[0]
    radii = 8 * arrays[2].shape[1] + 1
    precision_sum = np.zeros(radii)
    precision_count = np.zeros(radii)
    recall_sum = np.zeros(radii)
    recall_count = 0
    for distances, relevant in _relevance_batches(*arrays, count=num_items):
        rows = distances.shape[0]
        # Histogram of distances per query via one bincount on (row, distance) bins, then cumulate over radius.
        bins = (np.arange(rows)[:, None] * radii + distances).ravel()
        retrieved = np.bincount(bins, minlength=rows * radii).reshape(rows, radii).cumsum(axis=1)
        found = np.bincount(bins, weights=relevant.ravel(), minlength=rows * radii).reshape(rows, radii).cumsum(axis=1)
        nonempty = retrieved > 0
        precision_sum += np.divide(found, retrieved, out=np.zeros_like(found), where=nonempty).sum(axis=0)
        precision_count += nonempty.sum(axis=0)
        total_relevant = relevant.sum(axis=1)
        has_relevant = total_relevant > 0
        recall_sum += (found[has_relevant] / total_relevant[has_relevant, None]).sum(axis=0)
        recall_count += int(has_relevant.sum())
    precision = np.divide(precision_sum, precision_count, out=np.full(radii, np.nan), where=precision_count > 0)
    recall = recall_sum / recall_count if recall_count else np.full(radii, np.nan)
    return precision, recall


def cross_modal_hash_scores(
    image_codes_q: np.ndarray,
    image_labels_q: np.ndarray,
    text_codes_q: np.ndarray,
    text_labels_q: np.ndarray,
    image_codes_r: np.ndarray,
    image_labels_r: np.ndarray,
    text_codes_r: np.ndarray,
    text_labels_r: np.ndarray,
    *,
    top_n: int,
    ns: Sequence[int],
) -> dict[str, float]:
    """mAP@all, mAP@top-N and P@N for image->text ("i2t") and text->image ("t2i") Hamming retrieval.

    i2t: image query codes against the text retrieval codes; t2i: text query codes against the
    image retrieval codes. Codes come in real (`sign` or relaxed `tanh`) and are packed here.

    Args:
        image_codes_q: Image query codes `[Q, K]` real.
        image_labels_q: Their multi-hot labels `[Q, C]`.
        text_codes_q: Text query codes `[Q', K]` real.
        text_labels_q: Their labels `[Q', C]`.
        image_codes_r: Image retrieval codes `[N, K]` real.
        image_labels_r: Their labels `[N, C]`.
        text_codes_r: Text retrieval codes `[N', K]` real.
        text_labels_r: Their labels `[N', C]`.
        top_n: Cut-off of mAP@top-N.
        ns: Cut-offs of precision@N.

    Returns:
        `{"i2t/map@all", "t2i/map@all", "i2t/map@<top_n>", "t2i/map@<top_n>", "i2t/p@<n>", "t2i/p@<n>", ...}`.

    Raises:
        ValueError: Bad shapes, or cut-offs beyond a retrieval set.
    """
    directions = {
        "i2t": (image_codes_q, image_labels_q, text_codes_r, text_labels_r),
        "t2i": (text_codes_q, text_labels_q, image_codes_r, image_labels_r),
    }
    cutoffs = [int(n) for n in ns]
    if not cutoffs:
        raise ValueError("ns is empty: give at least one cut-off N for precision@N")
    scores: dict[str, float] = {}
    for direction, (queries, query_labels, retrieval, retrieval_labels) in directions.items():
        arrays = _validated(pack_codes(queries), query_labels, pack_codes(retrieval), retrieval_labels)
        num_items = arrays[2].shape[0]
        _check_size(f"top_n ({direction})", top_n, num_items=num_items)
        for cutoff in cutoffs:
            _check_size(f"every n in ns ({direction})", cutoff, num_items=num_items)
        # One ranking per direction serves all three metrics.
        map_all = map_top = 0.0
        hit_sums = dict.fromkeys(cutoffs, 0.0)
        for _, relevant in _relevance_batches(*arrays, count=num_items):
            map_all += float(_average_precision(relevant).sum())
            map_top += float(_average_precision(relevant[:, :top_n]).sum())
            hits = np.cumsum(relevant, axis=1, dtype=np.int32)
            for cutoff in cutoffs:
                hit_sums[cutoff] += float(hits[:, cutoff - 1].sum()) / cutoff
        num_queries = arrays[0].shape[0]
        scores[f"{direction}/map@all"] = map_all / num_queries
        scores[f"{direction}/map@{top_n}"] = map_top / num_queries
        for cutoff in cutoffs:
            scores[f"{direction}/p@{cutoff}"] = hit_sums[cutoff] / num_queries
    logger.debug("cross-modal hash scores: %s", scores)
    return scores


def _unit_rows(name: str, vectors: np.ndarray) -> np.ndarray:
    matrix = np.asarray(vectors, dtype=np.float32)
    if matrix.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, D], got shape {matrix.shape}")
    if matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {matrix.shape})")
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.maximum(norms, np.float32(1e-12))


def cross_modal_recall(
    image_vectors: np.ndarray, text_vectors: np.ndarray, text_owner: np.ndarray, *, ks: Sequence[int]
) -> dict[str, float]:
    """Recall@K for image->text and text->image retrieval by cosine similarity, and rsum.

    - "i2t/recall@K": fraction of images with at least one of their texts among the top K texts.
    - "t2i/recall@K": fraction of texts whose owner image is among the top K images.
    - "rsum": the sum of all of them (both directions, every K), as fractions: at most `2 * len(ks)`
      (papers usually quote it in percent, 100 times this).

    Vectors are L2-normalised here (a no-op for normalised input), so the score is the cosine.
    Equal scores rank by ascending index, as in the Hamming ranking. The search is a blocked
    matmul counting, per query, the candidates that rank before its best match; a block holds at
    most about `2**23` scores.

    Args:
        image_vectors: Image embeddings `[N, D]`.
        text_vectors: Text embeddings `[T, D]`.
        text_owner: Image index of each text `[T]` int, in `[0, N)`; every image owns at least one
            text (five per image is typical; any counts).
        ks: Cut-offs, each at least 1 (a K beyond the candidate count gives recall 1).

    Returns:
        `{"i2t/recall@K", "t2i/recall@K" for K in ks, "rsum"}`.

    Raises:
        ValueError: Bad shapes, dimension mismatch, owners out of range, an image owning no text,
            empty or non-positive `ks`.

    >>> images = np.eye(2, dtype=np.float32)
    >>> texts = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]], dtype=np.float32)
    >>> cross_modal_recall(images, texts, np.array([0, 1, 1]), ks=[1])["t2i/recall@1"]
    0.6666666666666666
    """
    images = _unit_rows("image_vectors", image_vectors)
    texts = _unit_rows("text_vectors", text_vectors)
    if images.shape[1] != texts.shape[1]:
        raise ValueError(
            f"image_vectors have dimension {images.shape[1]} (shape {images.shape}) but text_vectors have "
            f"{texts.shape[1]} (shape {texts.shape})"
        )
    owner = np.asarray(text_owner)
    if owner.shape != (texts.shape[0],):
        raise ValueError(f"text_owner must have shape [{texts.shape[0]}] (one per text), got {owner.shape}")
    if not np.issubdtype(owner.dtype, np.integer):
        raise ValueError(f"text_owner must hold integer image indices, got dtype {owner.dtype}")
    num_images, num_texts = images.shape[0], texts.shape[0]
    if owner.min() < 0 or owner.max() >= num_images:
        raise ValueError(
            f"text_owner must lie in [0, {num_images}) for {num_images} images, got values in "
            f"[{owner.min()}, {owner.max()}]"
        )
    owner = owner.astype(np.int64)
    texts_per_image = np.bincount(owner, minlength=num_images)
    if (texts_per_image == 0).any():
        orphans = np.flatnonzero(texts_per_image == 0)
        raise ValueError(
            f"{len(orphans)} images own no text (first: {orphans[:5].tolist()}); every image needs at least one"
        )
    cutoffs = [int(k) for k in ks]
    if not cutoffs or min(cutoffs) < 1:
        raise ValueError(f"ks must be a non-empty list of cut-offs >= 1, got {list(ks)}")

    image_ranks = np.empty(num_images, dtype=np.int64)
    text_positions = np.arange(num_texts)
    block = max(1, _PAIRS_PER_BATCH // num_texts)
    for start in range(0, num_images, block):
        scores = images[start : start + block] @ texts.T
        image_ids = np.arange(start, start + len(scores))
        owned = owner[None, :] == image_ids[:, None]
        owned_scores = np.where(owned, scores, -np.inf)
        # The best-ranked owned text: highest score, lowest index among equals (argmax takes the first).
        best_text = owned_scores.argmax(axis=1)
        best_score = np.take_along_axis(scores, best_text[:, None], axis=1)
        ahead = (scores > best_score) | ((scores == best_score) & (text_positions[None, :] < best_text[:, None]))
        image_ranks[start : start + len(scores)] = ahead.sum(axis=1)

    text_ranks = np.empty(num_texts, dtype=np.int64)
    image_positions = np.arange(num_images)
    block = max(1, _PAIRS_PER_BATCH // num_images)
    for start in range(0, num_texts, block):
        scores = texts[start : start + block] @ images.T
        owners = owner[start : start + len(scores)]
        own_score = np.take_along_axis(scores, owners[:, None], axis=1)
        ahead = (scores > own_score) | ((scores == own_score) & (image_positions[None, :] < owners[:, None]))
        text_ranks[start : start + len(scores)] = ahead.sum(axis=1)

    recalls: dict[str, float] = {}
    for cutoff in cutoffs:
        recalls[f"i2t/recall@{cutoff}"] = float((image_ranks < cutoff).mean())
    for cutoff in cutoffs:
        recalls[f"t2i/recall@{cutoff}"] = float((text_ranks < cutoff).mean())
    recalls["rsum"] = float(sum(recalls.values()))
    return recalls

"""Cross-modal metrics against brute-force references (plain loops over signs), hand-computed cases and Faiss.

The references never pack bits: a Hamming distance is the count of dimensions whose signs
differ, a ranking is a stable argsort of those distances (ties by ascending index), and AP is
summed term by term from its definition.
"""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from retrieval.evaluation import cross_modal
from retrieval.evaluation.cross_modal import (
    cross_modal_hash_scores,
    cross_modal_recall,
    hamming_pr_curve,
    hamming_ranking,
    hash_map,
    precision_at_n,
)
from retrieval.models.codes import pack_codes

# Codes, labels of the queries; codes, labels of the retrieval set.
HashSet = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]

# ---------------------------------------------------------------- references


def _reference_distances(query_codes: np.ndarray, retrieval_codes: np.ndarray) -> np.ndarray:
    distances = np.zeros((len(query_codes), len(retrieval_codes)), dtype=np.int64)
    for query in range(len(query_codes)):
        for item in range(len(retrieval_codes)):
            distances[query, item] = sum(
                (query_codes[query, bit] > 0) != (retrieval_codes[item, bit] > 0) for bit in range(query_codes.shape[1])
            )
    return distances


def _reference_rankings(query_codes: np.ndarray, retrieval_codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    distances = _reference_distances(query_codes, retrieval_codes)
    order = np.argsort(distances, axis=1, kind="stable")
    return np.take_along_axis(distances, order, axis=1), order


def _reference_relevance(query_labels: np.ndarray, retrieval_labels: np.ndarray) -> np.ndarray:
    relevant = np.zeros((len(query_labels), len(retrieval_labels)), dtype=bool)
    for query in range(len(query_labels)):
        for item in range(len(retrieval_labels)):
            relevant[query, item] = any(
                query_labels[query, label] > 0 and retrieval_labels[item, label] > 0
                for label in range(query_labels.shape[1])
            )
    return relevant


def _reference_map(
    query_codes: np.ndarray,
    query_labels: np.ndarray,
    retrieval_codes: np.ndarray,
    retrieval_labels: np.ndarray,
    top_n: int | None = None,
) -> float:
    _, order = _reference_rankings(query_codes, retrieval_codes)
    relevant = _reference_relevance(query_labels, retrieval_labels)
    cutoff = top_n or len(retrieval_codes)
    total = 0.0
    for query in range(len(query_codes)):
        hits, precision_sum = 0, 0.0
        for rank, item in enumerate(order[query][:cutoff], start=1):
            if relevant[query, item]:
                hits += 1
                precision_sum += hits / rank
        total += precision_sum / hits if hits else 0.0
    return total / len(query_codes)


def _reference_precision(
    query_codes: np.ndarray,
    query_labels: np.ndarray,
    retrieval_codes: np.ndarray,
    retrieval_labels: np.ndarray,
    cutoff: int,
) -> float:
    _, order = _reference_rankings(query_codes, retrieval_codes)
    relevant = _reference_relevance(query_labels, retrieval_labels)
    values = [sum(relevant[query, item] for item in order[query][:cutoff]) / cutoff for query in range(len(order))]
    return float(np.mean(values))


def _reference_pr(
    query_codes: np.ndarray, query_labels: np.ndarray, retrieval_codes: np.ndarray, retrieval_labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    distances = _reference_distances(query_codes, retrieval_codes)
    relevant = _reference_relevance(query_labels, retrieval_labels)
    num_bits = query_codes.shape[1]
    precision, recall = [], []
    for radius in range(num_bits + 1):
        precisions, recalls = [], []
        for query in range(len(query_codes)):
            retrieved = [item for item in range(len(retrieval_codes)) if distances[query, item] <= radius]
            found = sum(relevant[query, item] for item in retrieved)
            if retrieved:
                precisions.append(found / len(retrieved))
            if relevant[query].sum():
                recalls.append(found / relevant[query].sum())
        precision.append(np.mean(precisions) if precisions else np.nan)
        recall.append(np.mean(recalls) if recalls else np.nan)
    return np.array(precision), np.array(recall)


def _sign_codes(rng: np.random.Generator, count: int, bits: int) -> np.ndarray:
    return np.where(rng.random((count, bits)) < 0.5, -1.0, 1.0)


def _multi_hot(rng: np.random.Generator, count: int, classes: int, rate: float) -> np.ndarray:
    return (rng.random((count, classes)) < rate).astype(np.int64)


@pytest.fixture
def tied_set() -> HashSet:
    """8-bit codes over 200 items: only 9 possible distances, so almost every rank is a tie.

    Some queries and items carry no label, so some queries have no relevant item.
    """
    rng = np.random.default_rng(7)
    query_codes = _sign_codes(rng, 25, 8)
    retrieval_codes = _sign_codes(rng, 200, 8)
    query_labels = _multi_hot(rng, 25, 6, 0.2)
    retrieval_labels = _multi_hot(rng, 200, 6, 0.15)
    query_labels[:3] = 0
    assert (_reference_relevance(query_labels, retrieval_labels).sum(axis=1) == 0).sum() >= 3
    return query_codes, query_labels, retrieval_codes, retrieval_labels


@pytest.fixture
def hand_case() -> HashSet:
    """Query 0 has distances (1, 0, 1) to items (0, 1, 2): ranking 1, 0, 2 (the tie by index).

    Query 0's labels make items 1 and 2 relevant: ranked relevance (yes, no, yes),
    AP = (1/1 + 2/3) / 2 = 5/6. Query 1 has the same code and no label: AP 0.
    """
    plus = np.ones(8)
    item_0, item_2 = plus.copy(), plus.copy()
    item_0[3] = -1
    item_2[6] = -1
    retrieval_codes = np.stack([item_0, plus, item_2])
    query_codes = np.stack([plus, plus])
    query_labels = np.array([[1, 0], [0, 0]])
    retrieval_labels = np.array([[0, 1], [1, 1], [1, 0]])
    return query_codes, query_labels, retrieval_codes, retrieval_labels


# ---------------------------------------------------------------- packing and ranking


def test_pack_codes_bit_order_is_packbits_msb_first() -> None:
    codes = -np.ones((2, 16))
    codes[0, 0] = 0.3
    codes[1, 15] = 2.0
    codes[1, 8] = 1e-6
    assert pack_codes(codes).tolist() == [[128, 0], [0, 129]]
    assert pack_codes(codes).dtype == np.uint8
    # Zero is not positive: it packs to 0 like -1.
    assert pack_codes(np.zeros((1, 8))).tolist() == [[0]]


def test_faiss_hamming_on_packed_codes_counts_differing_signs() -> None:
    rng = np.random.default_rng(0)
    query_codes = rng.normal(size=(6, 64))
    retrieval_codes = rng.normal(size=(40, 64))
    index = faiss.IndexBinaryFlat(64)
    index.add(pack_codes(retrieval_codes))
    distances, indices = index.search(pack_codes(query_codes), 40)
    full = np.zeros((6, 40), dtype=np.int64)
    np.put_along_axis(full, indices, distances, axis=1)
    assert np.array_equal(full, _reference_distances(query_codes, retrieval_codes))


@pytest.mark.parametrize(
    ("top_n", "batch_size"), [(None, 1), (7, 1), (None, 7), (7, 7), (1, 1024), (200, 1024), (None, 1024)]
)
def test_hamming_ranking_matches_stable_brute_force_with_ties(
    tied_set: HashSet, top_n: int | None, batch_size: int
) -> None:
    query_codes, _, retrieval_codes, _ = tied_set
    distances, indices = hamming_ranking(
        pack_codes(query_codes), pack_codes(retrieval_codes), top_n=top_n, batch_size=batch_size
    )
    reference_distances, reference_order = _reference_rankings(query_codes, retrieval_codes)
    kept = top_n or 200
    assert distances.dtype == np.int32 and indices.dtype == np.int64
    assert distances.shape == indices.shape == (25, kept)
    assert np.array_equal(distances, reference_distances[:, :kept])
    assert np.array_equal(indices, reference_order[:, :kept])


class _TiesReversedBinaryFlat:
    """A Faiss binary index whose searches return items in descending index order (Faiss scans ascending)."""

    real_index_class = faiss.IndexBinaryFlat

    def __init__(self, bits: int) -> None:
        self.index = self.real_index_class(bits)

    def add(self, codes: np.ndarray) -> None:
        self.index.add(codes)

    def range_search(self, queries: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        limits, distances, indices = self.index.range_search(queries, radius)
        for query in range(len(queries)):
            segment = slice(int(limits[query]), int(limits[query + 1]))
            distances[segment], indices[segment] = distances[segment][::-1].copy(), indices[segment][::-1].copy()
        return limits, distances, indices

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        distances, indices = self.index.search(queries, k)
        order = np.lexsort((-indices, distances), axis=-1)
        return np.take_along_axis(distances, order, axis=1), np.take_along_axis(indices, order, axis=1)


@pytest.mark.parametrize("top_n", [None, 5])
def test_hamming_ranking_does_not_depend_on_faiss_tie_order(
    tied_set: HashSet, top_n: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    query_codes, query_labels, retrieval_codes, retrieval_labels = tied_set
    monkeypatch.setattr(cross_modal.faiss, "IndexBinaryFlat", _TiesReversedBinaryFlat)
    _, indices = hamming_ranking(pack_codes(query_codes), pack_codes(retrieval_codes), top_n=top_n)
    _, reference_order = _reference_rankings(query_codes, retrieval_codes)
    assert np.array_equal(indices, reference_order[:, : top_n or 200])
    value = hash_map(pack_codes(query_codes), query_labels, pack_codes(retrieval_codes), retrieval_labels, top_n=top_n)
    assert value == pytest.approx(
        _reference_map(query_codes, query_labels, retrieval_codes, retrieval_labels, top_n), abs=1e-12
    )


def test_hamming_ranking_orders_identical_codes_by_index() -> None:
    codes = pack_codes(np.ones((50, 16)))
    distances, indices = hamming_ranking(codes[:2], codes, top_n=10)
    assert indices.tolist() == [list(range(10))] * 2
    assert not distances.any()


# ---------------------------------------------------------------- mAP, P@N, PR curve


@pytest.mark.parametrize("top_n", [None, 1, 5, 50, 199, 200])
def test_hash_map_matches_reference_with_ties(tied_set: HashSet, top_n: int | None) -> None:
    query_codes, query_labels, retrieval_codes, retrieval_labels = tied_set
    value = hash_map(pack_codes(query_codes), query_labels, pack_codes(retrieval_codes), retrieval_labels, top_n=top_n)
    reference = _reference_map(query_codes, query_labels, retrieval_codes, retrieval_labels, top_n)
    assert value == pytest.approx(reference, abs=1e-12)


def test_hash_map_hand_computed_counts_query_without_relevant_as_zero(hand_case: HashSet) -> None:
    query_codes, query_labels, retrieval_codes, retrieval_labels = hand_case
    packed_queries, packed_retrieval = pack_codes(query_codes), pack_codes(retrieval_codes)
    assert hash_map(packed_queries, query_labels, packed_retrieval, retrieval_labels) == pytest.approx(5 / 12)
    # Top 2: (yes, no) -> AP@2 = 1 for query 0; query 1 still 0.
    assert hash_map(packed_queries, query_labels, packed_retrieval, retrieval_labels, top_n=2) == pytest.approx(0.5)
    # Top 1 of query 0 is item 1 (distance 0), relevant.
    assert hash_map(packed_queries[:1], query_labels[:1], packed_retrieval, retrieval_labels, top_n=1) == 1.0


def test_hash_map_counts_query_with_no_relevant_in_top_n_as_zero() -> None:
    # The only relevant item is last in the ranking: AP@all = 1/3, AP@2 = 0 (not skipped).
    codes = np.array([[1.0] * 8, [1.0] * 7 + [-1.0], [-1.0] * 8])
    labels = np.array([[1, 0], [0, 1], [0, 1], [1, 0]])
    queries, retrieval = pack_codes(codes[:1]), pack_codes(codes)
    assert hash_map(queries, labels[:1], retrieval, labels[1:]) == pytest.approx(1 / 3)
    assert hash_map(queries, labels[:1], retrieval, labels[1:], top_n=2) == 0.0


def test_perfect_codes_score_one() -> None:
    classes = np.repeat(np.arange(4), 10)
    labels = np.eye(4, dtype=np.int64)[classes]
    prototypes = np.array(
        [[1, 1, 1, 1, 1, 1, 1, 1], [-1, -1, -1, -1, 1, 1, 1, 1], [1, 1, 1, 1, -1, -1, -1, -1], [-1] * 8]
    )
    codes = pack_codes(prototypes[classes].astype(float))
    assert hash_map(codes, labels, codes, labels) == 1.0
    assert precision_at_n(codes, labels, codes, labels, ns=[1, 10, 11]) == {1: 1.0, 10: 1.0, 11: pytest.approx(10 / 11)}


def test_precision_at_n_matches_reference_with_ties(tied_set: HashSet) -> None:
    query_codes, query_labels, retrieval_codes, retrieval_labels = tied_set
    ns = [1, 3, 10, 57, 200]
    values = precision_at_n(pack_codes(query_codes), query_labels, pack_codes(retrieval_codes), retrieval_labels, ns=ns)
    assert list(values) == ns
    for cutoff in ns:
        reference = _reference_precision(query_codes, query_labels, retrieval_codes, retrieval_labels, cutoff)
        assert values[cutoff] == pytest.approx(reference, abs=1e-12)


def test_precision_at_n_hand_computed(hand_case: HashSet) -> None:
    query_codes, query_labels, retrieval_codes, retrieval_labels = hand_case
    values = precision_at_n(
        pack_codes(query_codes), query_labels, pack_codes(retrieval_codes), retrieval_labels, ns=[1, 2, 3]
    )
    assert values == {1: pytest.approx(0.5), 2: pytest.approx(0.25), 3: pytest.approx(1 / 3)}


def test_pr_curve_matches_reference(tied_set: HashSet) -> None:
    query_codes, query_labels, retrieval_codes, retrieval_labels = tied_set
    precision, recall = hamming_pr_curve(
        pack_codes(query_codes), query_labels, pack_codes(retrieval_codes), retrieval_labels
    )
    reference_precision, reference_recall = _reference_pr(query_codes, query_labels, retrieval_codes, retrieval_labels)
    assert precision.shape == recall.shape == (9,)
    np.testing.assert_allclose(precision, reference_precision, atol=1e-12)
    np.testing.assert_allclose(recall, reference_recall, atol=1e-12)
    assert recall[-1] == pytest.approx(1.0)


def test_pr_curve_hand_computed(hand_case: HashSet) -> None:
    query_codes, query_labels, retrieval_codes, retrieval_labels = hand_case
    precision, recall = hamming_pr_curve(
        pack_codes(query_codes), query_labels, pack_codes(retrieval_codes), retrieval_labels
    )
    # Radius 0: query 0 retrieves item 1 (P 1, R 1/2); query 1 retrieves item 1 too (P 0, no recall).
    # Radius >= 1: both retrieve all three (P 2/3 and 0; R 1).
    np.testing.assert_allclose(precision, [0.5] + [1 / 3] * 8)
    np.testing.assert_allclose(recall, [0.5] + [1.0] * 8)


def test_pr_curve_skips_empty_retrievals_in_precision() -> None:
    # A query far from every item retrieves nothing below radius 7: precision undefined there.
    retrieval_codes = np.array([[1.0] * 7 + [-1.0], [1.0] * 8, [-1.0] + [1.0] * 7])
    retrieval_labels = np.array([[0, 1], [0, 1], [1, 0]])
    precision, recall = hamming_pr_curve(
        pack_codes(-np.ones((1, 8))), np.array([[1, 0]]), pack_codes(retrieval_codes), retrieval_labels
    )
    assert np.isnan(precision[:7]).all()
    np.testing.assert_allclose(precision[7:], [0.5, 1 / 3])
    np.testing.assert_allclose(recall, [0.0] * 7 + [1.0, 1.0])


def test_metrics_are_the_same_in_small_batches(tied_set: HashSet, monkeypatch: pytest.MonkeyPatch) -> None:
    query_codes, query_labels, retrieval_codes, retrieval_labels = tied_set
    arguments = (pack_codes(query_codes), query_labels, pack_codes(retrieval_codes), retrieval_labels)
    whole = (hash_map(*arguments, top_n=20), precision_at_n(*arguments, ns=[5, 50]), hamming_pr_curve(*arguments))
    monkeypatch.setattr(cross_modal, "_PAIRS_PER_BATCH", 2200)  # 11 queries per batch over 200 items: 3 batches
    batched = (hash_map(*arguments, top_n=20), precision_at_n(*arguments, ns=[5, 50]), hamming_pr_curve(*arguments))
    assert batched[0] == pytest.approx(whole[0], abs=1e-12)
    assert batched[1] == pytest.approx(whole[1], abs=1e-12)
    np.testing.assert_allclose(batched[2][0], whole[2][0])
    np.testing.assert_allclose(batched[2][1], whole[2][1])


def test_cross_modal_hash_scores_pairs_each_query_modality_with_the_other_retrieval_set() -> None:
    rng = np.random.default_rng(3)
    image_q, text_q = rng.normal(size=(9, 16)), rng.normal(size=(11, 16))
    image_r, text_r = rng.normal(size=(60, 16)), rng.normal(size=(50, 16))
    labels = {name: _multi_hot(rng, size, 4, 0.3) for name, size in [("iq", 9), ("tq", 11), ("ir", 60), ("tr", 50)]}
    scores = cross_modal_hash_scores(
        image_q, labels["iq"], text_q, labels["tq"], image_r, labels["ir"], text_r, labels["tr"], top_n=20, ns=[1, 10]
    )
    assert sorted(scores) == sorted(
        f"{direction}/{metric}" for direction in ("i2t", "t2i") for metric in ("map@all", "map@20", "p@1", "p@10")
    )
    directions = {
        "i2t": (image_q, labels["iq"], text_r, labels["tr"]),
        "t2i": (text_q, labels["tq"], image_r, labels["ir"]),
    }
    for direction, (queries, query_labels, retrieval, retrieval_labels) in directions.items():
        assert scores[f"{direction}/map@all"] == pytest.approx(
            _reference_map(queries, query_labels, retrieval, retrieval_labels), abs=1e-12
        )
        assert scores[f"{direction}/map@20"] == pytest.approx(
            _reference_map(queries, query_labels, retrieval, retrieval_labels, 20), abs=1e-12
        )
        for cutoff in (1, 10):
            assert scores[f"{direction}/p@{cutoff}"] == pytest.approx(
                _reference_precision(queries, query_labels, retrieval, retrieval_labels, cutoff), abs=1e-12
            )


# ---------------------------------------------------------------- real-valued recall


def _reference_recall(images: np.ndarray, texts: np.ndarray, owner: np.ndarray, ks: list[int]) -> dict[str, float]:
    """Full cosine matrix in float64, a stable argsort per query, the first rank of a correct match."""
    images64 = images / np.linalg.norm(images, axis=1, keepdims=True)
    texts64 = texts / np.linalg.norm(texts, axis=1, keepdims=True)
    similarity = images64.astype(np.float64) @ texts64.astype(np.float64).T
    image_first_hit = []
    for image in range(len(images)):
        order = np.argsort(-similarity[image], kind="stable")
        image_first_hit.append(next(rank for rank, text in enumerate(order) if owner[text] == image))
    text_first_hit = []
    for text in range(len(texts)):
        order = np.argsort(-similarity[:, text], kind="stable")
        text_first_hit.append(int(np.flatnonzero(order == owner[text])[0]))
    result = {}
    for k in ks:
        result[f"i2t/recall@{k}"] = sum(rank < k for rank in image_first_hit) / len(images)
    for k in ks:
        result[f"t2i/recall@{k}"] = sum(rank < k for rank in text_first_hit) / len(texts)
    result["rsum"] = sum(result.values())
    return result


@pytest.fixture
def unequal_texts() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """15 images with 1 to 6 texts each, texts near their image so recall lies strictly between 0 and 1."""
    rng = np.random.default_rng(11)
    images = rng.normal(size=(15, 8)).astype(np.float32)
    counts = rng.integers(1, 7, size=15)
    owner = rng.permutation(np.repeat(np.arange(15), counts))
    texts = (images[owner] + 1.2 * rng.normal(size=(len(owner), 8))).astype(np.float32)
    return images, texts, owner


def test_cross_modal_recall_matches_full_matrix_reference(
    unequal_texts: tuple[np.ndarray, np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    images, texts, owner = unequal_texts
    ks = [1, 3, 5, 10, 1000]
    reference = _reference_recall(images, texts, owner, ks)
    assert 0 < reference["i2t/recall@1"] < 1 and 0 < reference["t2i/recall@1"] < 1
    values = cross_modal_recall(images, texts, owner, ks=ks)
    assert list(values) == list(reference)
    assert values == pytest.approx(reference, abs=1e-12)
    monkeypatch.setattr(cross_modal, "_PAIRS_PER_BATCH", 40)  # several blocks in both directions
    assert cross_modal_recall(images, texts, owner, ks=ks) == pytest.approx(reference, abs=1e-12)
    # Cosine: scaling rows changes nothing.
    scales = np.linspace(0.5, 3.0, len(texts), dtype=np.float32)[:, None]
    assert cross_modal_recall(images * 4, texts * scales, owner, ks=ks) == pytest.approx(reference, abs=1e-12)


def test_cross_modal_recall_hand_computed() -> None:
    # Images e0, e1. Texts: t0 = e0 (image 0); t1 = e1, t2 = (1, 0.1) (image 1).
    # i2t: image 0's best text is t0 (rank 0); image 1's is t1 (rank 0): R@1 = 1.
    # t2i: t0 -> image 0 first (hit); t1 -> image 1 (hit); t2 is closer to image 0 (miss at 1, hit at 2).
    images = np.eye(2, dtype=np.float32)
    texts = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]], dtype=np.float32)
    values = cross_modal_recall(images, texts, np.array([0, 1, 1]), ks=[1, 2])
    assert values == pytest.approx(
        {
            "i2t/recall@1": 1.0,
            "i2t/recall@2": 1.0,
            "t2i/recall@1": 2 / 3,
            "t2i/recall@2": 1.0,
            "rsum": 1 + 1 + 2 / 3 + 1,
        }
    )


def test_cross_modal_recall_breaks_score_ties_by_index() -> None:
    # Both images are identical: every text ties between them and ranks image 0 first.
    images = np.array([[1.0, 0.0], [1.0, 0.0]], dtype=np.float32)
    texts = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    owner = np.array([1, 0, 1])
    values = cross_modal_recall(images, texts, owner, ks=[1])
    # t2i: text 1 (owner 0) hits, texts 0 and 2 (owner 1) miss. i2t: image 0's text t1 ties t0 (index 0 first):
    # miss; image 1's text t0 is first: hit.
    assert values["t2i/recall@1"] == pytest.approx(1 / 3)
    assert values["i2t/recall@1"] == pytest.approx(0.5)
    assert values == pytest.approx(_reference_recall(images, texts, owner, [1]))


def test_cross_modal_recall_perfect_embedding_scores_one() -> None:
    rng = np.random.default_rng(5)
    images = rng.normal(size=(20, 16)).astype(np.float32)
    owner = np.repeat(np.arange(20), 5)
    texts = images[owner] + 1e-3 * rng.normal(size=(100, 16)).astype(np.float32)
    values = cross_modal_recall(images, texts, owner, ks=[1, 5, 10])
    assert values["rsum"] == pytest.approx(6.0)
    assert all(values[f"{direction}/recall@{k}"] == 1.0 for direction in ("i2t", "t2i") for k in (1, 5, 10))


# ---------------------------------------------------------------- errors


def test_pack_codes_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"K = 12 bits .*multiple of 8"):
        pack_codes(np.ones((3, 12)))
    with pytest.raises(ValueError, match="empty"):
        pack_codes(np.ones((0, 8)))
    with pytest.raises(ValueError, match=r"2-D .*shape \(8,\)"):
        pack_codes(np.ones(8))


def test_hamming_functions_reject_bad_inputs(hand_case: HashSet) -> None:
    query_codes, query_labels, retrieval_codes, retrieval_labels = hand_case
    packed_queries, packed_retrieval = pack_codes(query_codes), pack_codes(retrieval_codes)
    with pytest.raises(ValueError, match=r"16 bits.*8 bits"):
        hamming_ranking(pack_codes(np.ones((2, 16))), packed_retrieval)
    with pytest.raises(ValueError, match=r"packed uint8.*float64"):
        hash_map(query_codes, query_labels, packed_retrieval, retrieval_labels)
    with pytest.raises(ValueError, match="empty"):
        hamming_ranking(packed_queries[:0], packed_retrieval)
    with pytest.raises(ValueError, match=r"top_n must lie in \[1, 3\].*got 4"):
        hamming_ranking(packed_queries, packed_retrieval, top_n=4)
    with pytest.raises(ValueError, match=r"top_n must lie in \[1, 3\].*got 0"):
        hash_map(packed_queries, query_labels, packed_retrieval, retrieval_labels, top_n=0)
    with pytest.raises(ValueError, match="batch_size"):
        hamming_ranking(packed_queries, packed_retrieval, batch_size=0)
    with pytest.raises(ValueError, match=r"retrieval_labels has 2 rows.*retrieval_codes has 3"):
        hash_map(packed_queries, query_labels, packed_retrieval, retrieval_labels[:2])
    with pytest.raises(ValueError, match=r"3 classes.*2"):
        hamming_pr_curve(packed_queries, np.ones((2, 3)), packed_retrieval, retrieval_labels)
    with pytest.raises(ValueError, match=r"multi-hot labels \[N, C\]"):
        hash_map(packed_queries, np.array([0, 1]), packed_retrieval, retrieval_labels)
    with pytest.raises(ValueError, match="ns is empty"):
        precision_at_n(packed_queries, query_labels, packed_retrieval, retrieval_labels, ns=[])
    with pytest.raises(ValueError, match=r"every n in ns must lie in \[1, 3\].*got 1000"):
        precision_at_n(packed_queries, query_labels, packed_retrieval, retrieval_labels, ns=[1, 1000])


def test_cross_modal_recall_rejects_bad_inputs() -> None:
    images, texts = np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float32)
    with pytest.raises(ValueError, match=r"dimension 2 .*text_vectors have 3"):
        cross_modal_recall(images, np.ones((2, 3)), np.array([0, 1]), ks=[1])
    with pytest.raises(ValueError, match=r"text_owner must have shape \[2\]"):
        cross_modal_recall(images, texts, np.array([0, 1, 1]), ks=[1])
    with pytest.raises(ValueError, match=r"\[0, 2\).*\[0, 2\]"):
        cross_modal_recall(images, texts, np.array([0, 2]), ks=[1])
    with pytest.raises(ValueError, match=r"1 images own no text \(first: \[1\]\)"):
        cross_modal_recall(images, texts, np.array([0, 0]), ks=[1])
    with pytest.raises(ValueError, match="ks must be"):
        cross_modal_recall(images, texts, np.array([0, 1]), ks=[])
    with pytest.raises(ValueError, match="empty"):
        cross_modal_recall(images[:0], texts, np.array([0, 1]), ks=[1])
    with pytest.raises(ValueError, match="integer"):
        cross_modal_recall(images, texts, np.array([0.0, 1.0]), ks=[1])

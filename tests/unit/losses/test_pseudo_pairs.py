"""Pseudo-pair mining against brute-force loops, and the far-negative restriction of the loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.utils import loss_and_miner_utils as pml_mining

from retrieval.errors import DatasetError
from retrieval.losses.metric import MetricLoss
from retrieval.losses.pseudo_pairs import (
    PseudoPairLoss,
    far_pairs,
    keep_far_negatives,
    mine_pseudo_pairs,
    nearest_neighbours,
)

# Two tight clusters, interleaved by index, and three outliers, each leaning towards a cluster
# (so its nearest neighbours are cluster members, which never pick it back).
CLUSTER_A = [0, 2, 4, 6]
CLUSTER_B = [1, 3, 5, 7]
OUTLIERS = [8, 9, 10]


def _hand_made_features() -> np.ndarray:
    rows = [
        [1.00, 0.00, 0.05, 0.00, 0.01, 0.00],
        [0.00, 1.00, 0.00, 0.04, 0.00, 0.02],
        [1.00, 0.00, 0.00, 0.06, 0.00, 0.02],
        [0.00, 1.00, 0.05, 0.00, 0.03, 0.00],
        [1.00, 0.03, 0.00, 0.00, 0.07, 0.00],
        [0.02, 1.00, 0.00, 0.00, 0.00, 0.06],
        [1.00, 0.00, 0.02, 0.02, 0.00, 0.05],
        [0.00, 1.00, 0.01, 0.03, 0.04, 0.00],
        [1.00, 0.00, 1.50, 0.00, 0.00, 0.00],
        [0.00, 1.00, 0.00, 1.40, 0.00, 0.00],
        [0.60, 0.00, 0.00, 0.00, 0.00, 1.00],
    ]
    features = np.array(rows, dtype=np.float64)
    return features / np.linalg.norm(features, axis=1, keepdims=True)


def _brute_force_ranking(features: np.ndarray) -> list[list[int]]:
    """Every row's other rows, most similar first, by a plain double loop."""
    rows = features.tolist()
    ranking = []
    for i, query in enumerate(rows):
        similarities = [
            (sum(a * b for a, b in zip(query, other, strict=True)), j) for j, other in enumerate(rows) if j != i
        ]
        ranking.append([j for _, j in sorted(similarities, key=lambda pair: -pair[0])])
    return ranking


def _brute_force_classes(ranking: list[list[int]], *, knn_k: int) -> list[int]:
    """Union-find over mutual kNN edges; singletons -1, classes numbered by first member."""
    total = len(ranking)
    parent = list(range(total))

    def root(node: int) -> int:
        while parent[node] != node:
            node = parent[node]
        return node

    for i in range(total):
        for j in ranking[i][:knn_k]:
            if i in ranking[j][:knn_k]:
                parent[root(i)] = root(j)
    members: dict[int, list[int]] = {}
    for node in range(total):
        members.setdefault(root(node), []).append(node)
    labels = [-1] * total
    next_class = 0
    for node in range(total):
        group = members[root(node)]
        if len(group) >= 2 and labels[node] == -1:
            for member in group:
                labels[member] = next_class
            next_class += 1
    return labels


def _brute_force_far(ranking: list[list[int]], *, negative_rank: int, first: int, second: int) -> bool:
    return second not in ranking[first][:negative_rank] and first not in ranking[second][:negative_rank]


def test_hand_made_clusters_become_two_pseudo_classes_and_outliers_are_left_out() -> None:
    mined = mine_pseudo_pairs(_hand_made_features(), knn_k=3, negative_rank=5)
    expected = np.full(11, -1)
    expected[CLUSTER_A] = 0
    expected[CLUSTER_B] = 1
    np.testing.assert_array_equal(mined.labels, expected)
    assert mined.num_classes == 2


@pytest.mark.parametrize(("knn_k", "negative_rank"), [(1, 1), (2, 4), (3, 5), (3, 7)])
def test_mining_matches_brute_force_on_the_hand_made_features(knn_k: int, negative_rank: int) -> None:
    features = _hand_made_features()
    ranking = _brute_force_ranking(features)
    mined = mine_pseudo_pairs(features, knn_k=knn_k, negative_rank=negative_rank)
    assert mined.labels.tolist() == _brute_force_classes(ranking, knn_k=knn_k)
    assert mined.neighbours.tolist() == [row[:negative_rank] for row in ranking]


def test_mining_matches_brute_force_on_random_features() -> None:
    generator = np.random.default_rng(3)
    features = generator.normal(size=(60, 8))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    ranking = _brute_force_ranking(features)
    mined = mine_pseudo_pairs(features, knn_k=4, negative_rank=12)
    assert mined.labels.tolist() == _brute_force_classes(ranking, knn_k=4)
    assert mined.neighbours.tolist() == [row[:12] for row in ranking]

    table = torch.from_numpy(mined.neighbours).sort(dim=1).values
    batch = torch.tensor([5, 17, 5, 40, 33, 2, 59, 17])
    far = far_pairs(table, batch)
    for a, first in enumerate(batch.tolist()):
        for b, second in enumerate(batch.tolist()):
            expected = _brute_force_far(ranking, negative_rank=12, first=first, second=second)
            assert bool(far[a, b]) == expected, (first, second)


def test_far_pairs_on_a_hand_written_table() -> None:
    # Item 0 is near 1 and 2; item 3 is near 0 (one way round is enough to be near).
    table = torch.tensor([[1, 2], [0, 4], [0, 1], [0, 4], [1, 3]]).sort(dim=1).values
    far = far_pairs(table, torch.tensor([0, 1, 3, 4, 0]))
    expected = torch.tensor(
        [
            # 0      1      3      4      0
            [True, False, False, True, True],
            [False, True, True, False, False],
            [False, True, True, False, False],
            [True, False, False, True, True],
            [True, False, False, True, True],
        ]
    )
    torch.testing.assert_close(far, expected)


def test_nearest_neighbours_never_lists_a_row_itself_even_beside_an_exact_duplicate() -> None:
    features = np.array([[1.0, 0.0], [1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    found = nearest_neighbours(features, count=2)
    assert found.shape == (4, 2)
    for row, neighbours in enumerate(found.tolist()):
        assert row not in neighbours and len(set(neighbours)) == 2
    assert found[0, 0] == 1 and found[1, 0] == 0


def test_too_few_images_for_the_negative_rank_is_a_clear_error() -> None:
    with pytest.raises(DatasetError, match="needs more than 11 training images, got 11"):
        mine_pseudo_pairs(_hand_made_features(), knn_k=3, negative_rank=11)


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(8, 4, generator=generator, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    upper = torch.rand(8, 8, generator=generator) < 0.5
    far = torch.triu(upper, diagonal=1)
    return embeddings, labels, far | far.T


def test_keep_far_negatives_filters_pairs_and_triplets_like_a_loop() -> None:
    _, labels, far = _batch()
    pairs = pml_mining.get_all_pairs_indices(labels)
    kept = keep_far_negatives(pairs, far)
    assert torch.equal(kept[0], pairs[0]) and torch.equal(kept[1], pairs[1])
    expected = [(a, n) for a, n in zip(pairs[2].tolist(), pairs[3].tolist(), strict=True) if far[a, n]]
    assert list(zip(kept[2].tolist(), kept[3].tolist(), strict=True)) == expected

    triplets = pml_mining.get_all_triplets_indices(labels)
    kept_triplets = keep_far_negatives(triplets, far)
    expected_triplets = [(a, p, n) for a, p, n in zip(*(part.tolist() for part in triplets), strict=True) if far[a, n]]
    assert list(zip(*(part.tolist() for part in kept_triplets), strict=True)) == expected_triplets
    with pytest.raises(ValueError, match="got 2 tensors"):
        keep_far_negatives((labels, labels), far)


def test_contrastive_without_miner_equals_pml_on_the_far_pairs() -> None:
    embeddings, labels, far = _batch()
    loss = PseudoPairLoss(metric=MetricLoss(loss="contrastive", use_miner=False))
    value = loss(embeddings, labels, far)["metric"]

    a1, p, a2, n = pml_mining.get_all_pairs_indices(labels)
    keep = torch.tensor([bool(far[a, b]) for a, b in zip(a2.tolist(), n.tolist(), strict=True)])
    direct = pml_losses.ContrastiveLoss(pos_margin=1.0, neg_margin=0.0, distance=CosineSimilarity())
    torch.testing.assert_close(value, direct(embeddings, labels, (a1, p, a2[keep], n[keep])))
    assert not math.isclose(value.item(), loss(embeddings, labels)["metric"].item()), "far pairs changed nothing"


def test_multi_similarity_keeps_only_the_far_mined_negatives() -> None:
    embeddings, labels, far = _batch()
    loss = PseudoPairLoss(metric=MetricLoss(loss="multi_similarity", ms_miner_epsilon=10.0))
    value = loss(embeddings, labels, far)["metric"]

    a1, p, a2, n = pml_miners.MultiSimilarityMiner(epsilon=10.0)(embeddings, labels)
    keep = torch.tensor([bool(far[a, b]) for a, b in zip(a2.tolist(), n.tolist(), strict=True)], dtype=torch.bool)
    direct = pml_losses.MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5)
    torch.testing.assert_close(value, direct(embeddings, labels, (a1, p, a2[keep], n[keep])))


def test_triplet_without_miner_uses_every_far_triplet() -> None:
    embeddings, labels, far = _batch()
    loss = PseudoPairLoss(metric=MetricLoss(loss="triplet", use_miner=False, triplet_margin=0.5))
    value = loss(embeddings, labels, far)["metric"]
    a, p, n = pml_mining.get_all_triplets_indices(labels)
    keep = far[a, n]
    direct = pml_losses.TripletMarginLoss(margin=0.5)
    torch.testing.assert_close(value, direct(embeddings, labels, (a[keep], p[keep], n[keep])))

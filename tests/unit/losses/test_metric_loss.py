"""MetricLoss against plain-loop references on a handful of hand-built embeddings.

The references follow the papers and pytorch-metric-learning 2.x's conventions, read in
its source: Multi-Similarity averages the per-anchor loss over every anchor of the batch
(MeanReducer; an anchor without positives or negatives adds 0 for that term), while
triplet and contrastive average only the terms that are non-zero (AvgNonZeroReducer),
contrastive separately for positive and negative pairs and then summed.
"""

from __future__ import annotations

import math

import pytest
import torch

from retrieval.losses import MetricLoss

# Unit vectors at these angles (degrees) in the plane: class 0 spans 0..70, class 1 sits
# between class 0's members, class 2 is a single image (an anchor with no positive).
ANGLES = [0.0, 20.0, 70.0, 50.0, 100.0, 160.0]
LABELS = [0, 0, 0, 1, 1, 2]


def _embeddings() -> list[list[float]]:
    return [[math.cos(math.radians(angle)), math.sin(math.radians(angle))] for angle in ANGLES]


def _as_tensor(vectors: list[list[float]]) -> torch.Tensor:
    return torch.tensor(vectors, dtype=torch.float64, requires_grad=True)


def _cosine(first: list[float], second: list[float]) -> float:
    dot = sum(a * b for a, b in zip(first, second, strict=True))
    return dot / (math.sqrt(sum(a * a for a in first)) * math.sqrt(sum(b * b for b in second)))


def _euclidean(first: list[float], second: list[float]) -> float:
    norm_first = math.sqrt(sum(a * a for a in first))
    norm_second = math.sqrt(sum(b * b for b in second))
    return math.sqrt(sum((a / norm_first - b / norm_second) ** 2 for a, b in zip(first, second, strict=True)))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def multi_similarity_reference(
    vectors: list[list[float]], labels: list[int], *, alpha: float, beta: float, base: float
) -> float:
    """Wang et al. 2019, eq. 12, over all pairs (no mining), averaged over every anchor."""
    per_anchor = []
    for i, anchor in enumerate(vectors):
        positive_sum = 0.0
        negative_sum = 0.0
        has_positive = has_negative = False
        for j, other in enumerate(vectors):
            if j == i:
                continue
            similarity = _cosine(anchor, other)
            if labels[j] == labels[i]:
                positive_sum += math.exp(-alpha * (similarity - base))
                has_positive = True
            else:
                negative_sum += math.exp(beta * (similarity - base))
                has_negative = True
        term = 0.0
        if has_positive:
            term += math.log(1.0 + positive_sum) / alpha
        if has_negative:
            term += math.log(1.0 + negative_sum) / beta
        per_anchor.append(term)
    return _mean(per_anchor)


def triplet_reference(vectors: list[list[float]], labels: list[int], *, margin: float, mining: str) -> float:
    """Hinge triplet loss on mined triplets, averaged over the triplets with a positive loss."""
    losses = []
    for a, anchor in enumerate(vectors):
        for p, positive in enumerate(vectors):
            if p == a or labels[p] != labels[a]:
                continue
            for n, negative in enumerate(vectors):
                if labels[n] == labels[a]:
                    continue
                anchor_positive = _euclidean(anchor, positive)
                anchor_negative = _euclidean(anchor, negative)
                triplet_margin = anchor_negative - anchor_positive
                violates = triplet_margin <= margin
                if mining == "hard":
                    violates = violates and triplet_margin <= 0
                elif mining == "semihard":
                    violates = violates and triplet_margin > 0
                if violates:
                    losses.append(max(0.0, anchor_positive - anchor_negative + margin))
    return _mean([loss for loss in losses if loss > 0])


def contrastive_reference(
    vectors: list[list[float]], labels: list[int], *, pos_margin: float, neg_margin: float
) -> float:
    """Hadsell et al. 2006 on cosine similarity: mean non-zero positive + mean non-zero negative term."""
    positive_losses = []
    negative_losses = []
    for i, first in enumerate(vectors):
        for j, second in enumerate(vectors):
            if i == j:
                continue
            similarity = _cosine(first, second)
            if labels[i] == labels[j]:
                positive_losses.append(max(0.0, pos_margin - similarity))
            else:
                negative_losses.append(max(0.0, similarity - neg_margin))
    return _mean([loss for loss in positive_losses if loss > 0]) + _mean([loss for loss in negative_losses if loss > 0])


@pytest.mark.parametrize(("alpha", "beta", "base"), [(2.0, 50.0, 0.5), (1.0, 10.0, 0.3)])
def test_multi_similarity_matches_a_plain_loop(alpha: float, beta: float, base: float) -> None:
    criterion = MetricLoss(loss="multi_similarity", use_miner=False, ms_alpha=alpha, ms_beta=beta, ms_base=base)
    loss = criterion(_as_tensor(_embeddings()), torch.tensor(LABELS))["metric"]
    expected = multi_similarity_reference(_embeddings(), LABELS, alpha=alpha, beta=beta, base=base)
    assert expected > 0
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)


@pytest.mark.parametrize(("mining", "margin"), [("hard", 0.1), ("hard", 0.3), ("semihard", 0.3), ("all", 0.3)])
def test_triplet_with_its_miner_matches_a_plain_loop(mining: str, margin: float) -> None:
    criterion = MetricLoss(loss="triplet", triplet_mining=mining, triplet_margin=margin)  # type: ignore[arg-type]
    loss = criterion(_as_tensor(_embeddings()), torch.tensor(LABELS))["metric"]
    expected = triplet_reference(_embeddings(), LABELS, margin=margin, mining=mining)
    assert expected > 0
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)


@pytest.mark.parametrize(("pos_margin", "neg_margin"), [(1.0, 0.0), (0.8, 0.3)])
def test_contrastive_matches_a_plain_loop(pos_margin: float, neg_margin: float) -> None:
    criterion = MetricLoss(
        loss="contrastive",
        use_miner=False,
        contrastive_pos_margin=pos_margin,
        contrastive_neg_margin=neg_margin,
    )
    loss = criterion(_as_tensor(_embeddings()), torch.tensor(LABELS))["metric"]
    expected = contrastive_reference(_embeddings(), LABELS, pos_margin=pos_margin, neg_margin=neg_margin)
    assert expected > 0
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)


@pytest.mark.parametrize("loss_name", ["triplet", "multi_similarity", "contrastive"])
def test_loss_is_a_named_scalar_whose_gradient_reaches_the_embeddings(loss_name: str) -> None:
    criterion = MetricLoss(loss=loss_name)  # type: ignore[arg-type]
    embeddings = _as_tensor(_embeddings())
    terms = criterion(embeddings, torch.tensor(LABELS))
    assert list(terms) == ["metric"]
    assert terms["metric"].ndim == 0
    assert terms["metric"].item() > 0
    terms["metric"].backward()
    assert embeddings.grad is not None
    assert torch.isfinite(embeddings.grad).all()
    assert embeddings.grad.abs().sum().item() > 0


@pytest.mark.parametrize("loss_name", ["triplet", "multi_similarity", "contrastive"])
def test_loss_is_zero_but_differentiable_when_nothing_is_mined(loss_name: str) -> None:
    # One class and identical embeddings: no negatives for any miner, and no positive pair
    # below the contrastive positive margin (cosine similarity is exactly 1).
    criterion = MetricLoss(loss=loss_name)  # type: ignore[arg-type]
    embeddings = _as_tensor([[1.0, 0.0, 0.0]] * 4)
    loss = criterion(embeddings, torch.zeros(4, dtype=torch.long))["metric"]
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert embeddings.grad is not None
    assert torch.equal(embeddings.grad, torch.zeros_like(embeddings))


def test_unknown_loss_name_is_rejected_by_name() -> None:
    with pytest.raises(ValueError, match="unknown metric loss 'arcface'"):
        MetricLoss(loss="arcface")  # type: ignore[arg-type]

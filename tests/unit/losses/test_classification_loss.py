"""ClassificationLoss against plain-loop references and against pytorch-metric-learning called directly.

References follow the papers with pytorch-metric-learning 2.x's conventions (read in its
source): class weights `W` are `[D, C]`; normalised softmax and ArcFace use the cosine of the
embedding to each L2-normalised column; ArcFace's margin is given in degrees and, past
`pi - m`, the target logit is `cos(theta) - m sin(m)` to stay monotonic; the loss is the
mean cross-entropy over the batch.
"""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses

from retrieval.losses.classification import ClassificationLoss

# Five embeddings in 3-D, the last one pointing away from its class's weight (an angle past
# pi - margin for ArcFace), and targets over four classes.
EMBEDDINGS = [
    [1.0, 0.2, 0.0],
    [0.1, 1.0, 0.3],
    [-0.5, 0.4, 1.0],
    [0.7, -0.7, 0.1],
    [-1.0, -0.1, -0.2],
]
TARGETS = [0, 1, 2, 3, 0]
CLASSES = 4


def _class_weights() -> torch.Tensor:
    """`[D, C]` weights, fixed so the references see exactly what the module holds."""
    return torch.tensor(
        [
            [1.0, 0.0, 0.2, 0.5],
            [0.1, 1.0, -0.3, -0.6],
            [0.0, 0.2, 1.0, 0.1],
        ]
    )


def _cosine(first: list[float], second: list[float]) -> float:
    dot = sum(a * b for a, b in zip(first, second, strict=True))
    return dot / (math.sqrt(sum(a * a for a in first)) * math.sqrt(sum(b * b for b in second)))


def _column(weights: torch.Tensor, index: int) -> list[float]:
    return [float(value) for value in weights[:, index]]


def _cross_entropy(logits: list[float], target: int) -> float:
    return -logits[target] + math.log(sum(math.exp(logit) for logit in logits))


def normalized_softmax_reference(weights: torch.Tensor, *, temperature: float) -> float:
    losses = []
    for embedding, target in zip(EMBEDDINGS, TARGETS, strict=True):
        logits = [_cosine(embedding, _column(weights, c)) / temperature for c in range(CLASSES)]
        losses.append(_cross_entropy(logits, target))
    return sum(losses) / len(losses)


def arcface_reference(weights: torch.Tensor, *, margin_degrees: float, scale: float) -> float:
    margin = math.radians(margin_degrees)
    losses = []
    for embedding, target in zip(EMBEDDINGS, TARGETS, strict=True):
        logits = []
        for c in range(CLASSES):
            cosine = _cosine(embedding, _column(weights, c))
            if c == target:
                angle = math.acos(max(-1.0, min(1.0, cosine)))
                cosine = math.cos(angle + margin) if angle <= math.pi - margin else cosine - margin * math.sin(margin)
            logits.append(scale * cosine)
        losses.append(_cross_entropy(logits, target))
    return sum(losses) / len(losses)


def softmax_reference(weight: torch.Tensor, bias: torch.Tensor) -> float:
    losses = []
    for embedding, target in zip(EMBEDDINGS, TARGETS, strict=True):
        logits = [
            sum(float(weight[c, d]) * embedding[d] for d in range(len(embedding))) + float(bias[c])
            for c in range(CLASSES)
        ]
        losses.append(_cross_entropy(logits, target))
    return sum(losses) / len(losses)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(EMBEDDINGS, dtype=torch.float64), torch.tensor(TARGETS)


def _loss_with_weights(head: str, **settings: float) -> ClassificationLoss:
    loss = ClassificationLoss(head=head, num_classes=CLASSES, embedding_dim=3, **settings)  # type: ignore[arg-type]
    with torch.no_grad():
        if head == "softmax":
            loss.criterion.get_parameter("linear.weight").copy_(_class_weights().T)
            loss.criterion.get_parameter("linear.bias").copy_(torch.tensor([0.1, -0.2, 0.0, 0.3]))
        else:
            loss.criterion.get_parameter("W").copy_(_class_weights())
    return loss.double()


@pytest.mark.parametrize("temperature", [0.05, 0.5])
def test_normalized_softmax_matches_the_reference_and_pml(temperature: float) -> None:
    loss = _loss_with_weights("normalized_softmax", temperature=temperature)
    embeddings, targets = _batch()
    value = loss(embeddings, targets)["classification"]
    assert value.item() == pytest.approx(normalized_softmax_reference(_class_weights(), temperature=temperature))

    direct = pml_losses.NormalizedSoftmaxLoss(num_classes=CLASSES, embedding_size=3, temperature=temperature).double()
    with torch.no_grad():
        direct.W.copy_(_class_weights())
    torch.testing.assert_close(value, direct(embeddings, targets))


@pytest.mark.parametrize(("margin", "scale"), [(28.6, 64.0), (10.0, 8.0)])
def test_arcface_matches_the_reference_and_pml(margin: float, scale: float) -> None:
    loss = _loss_with_weights("arcface", arcface_margin=margin, arcface_scale=scale)
    embeddings, targets = _batch()
    value = loss(embeddings, targets)["classification"]
    assert value.item() == pytest.approx(arcface_reference(_class_weights(), margin_degrees=margin, scale=scale))

    direct = pml_losses.ArcFaceLoss(num_classes=CLASSES, embedding_size=3, margin=margin, scale=scale).double()
    with torch.no_grad():
        direct.W.copy_(_class_weights())
    torch.testing.assert_close(value, direct(embeddings, targets))


def test_the_last_embedding_is_past_pi_minus_the_margin() -> None:
    """The fixture exercises ArcFace's monotonic branch (else the reference's `else` would be untested)."""
    angle = math.degrees(math.acos(_cosine(EMBEDDINGS[-1], _column(_class_weights(), TARGETS[-1]))))
    assert angle > 180.0 - 28.6


def test_softmax_is_cross_entropy_of_a_linear_layer() -> None:
    loss = _loss_with_weights("softmax")
    embeddings, targets = _batch()
    value = loss(embeddings, targets)["classification"]
    assert value.item() == pytest.approx(softmax_reference(_class_weights().T, torch.tensor([0.1, -0.2, 0.0, 0.3])))


@pytest.mark.parametrize("head", ["softmax", "normalized_softmax", "arcface"])
def test_the_class_weights_are_parameters_of_the_loss_module(head: str) -> None:
    loss = ClassificationLoss(head=head, num_classes=7, embedding_dim=5)  # type: ignore[arg-type]
    sizes = sorted(parameter.numel() for parameter in loss.parameters())
    assert sizes == ([7, 35] if head == "softmax" else [35])
    embeddings = torch.nn.functional.normalize(torch.randn(6, 5), dim=1)
    loss(embeddings, torch.tensor([0, 1, 2, 3, 4, 6]))["classification"].backward()
    assert all(parameter.grad is not None and parameter.grad.abs().sum() > 0 for parameter in loss.parameters())


def test_an_unknown_head_or_an_empty_head_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown classification head 'cosface'"):
        ClassificationLoss(head="cosface", num_classes=3, embedding_dim=4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_classes >= 1 and embedding_dim >= 1, got 0 and 4"):
        ClassificationLoss(head="softmax", num_classes=0, embedding_dim=4)

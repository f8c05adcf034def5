"""The cross-modal losses (thesis ch. 3 and 4) against plain-loop references.

Each reference is written from the formulas in METHODS.md, one pair or one row at a time in
float64 Python arithmetic: cosine label similarity, the DCMH likelihood, quantisation, bit
balance, the modality entropy, VSE++ hardest-negative ranking over every positive pair, CMPM in
both directions, and the temperature-scaled label KL.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

from retrieval.losses.cross_modal import (
    bidirectional_ranking_loss,
    bit_balance_loss,
    label_calibration_loss,
    label_similarity,
    modality_classification_loss,
    modality_entropy_loss,
    pairwise_likelihood_loss,
    projection_matching_loss,
    quantization_loss,
)
from retrieval.models.cross_modal import ModalityClassifier

SHAPES = [(1, 1, 3), (4, 6, 8), (7, 3, 16)]


def _tensor(array: np.ndarray, *, grad: bool = False) -> torch.Tensor:
    return torch.tensor(array, dtype=torch.float64, requires_grad=grad)


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    return sum(float(x) * float(y) for x, y in zip(a, b, strict=True))


def _softmax(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(value - top) for value in row]
    return [value / sum(exps) for value in exps]


def _assert_finite_gradients(loss: torch.Tensor, *inputs: torch.Tensor) -> None:
    loss.backward()
    for tensor in inputs:
        assert tensor.grad is not None
        assert torch.isfinite(tensor.grad).all()


# --- label similarity -------------------------------------------------------------------------


def _reference_similarity(labels_a: np.ndarray, labels_b: np.ndarray) -> np.ndarray:
    result = np.zeros((len(labels_a), len(labels_b)))
    for i, row_a in enumerate(labels_a):
        for j, row_b in enumerate(labels_b):
            norm_a, norm_b = math.sqrt(_dot(row_a, row_a)), math.sqrt(_dot(row_b, row_b))
            result[i, j] = 0.0 if norm_a == 0 or norm_b == 0 else _dot(row_a, row_b) / (norm_a * norm_b)
    return result


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_label_similarity_matches_cosine_of_label_vectors(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels_a = (rng.random((6, 5)) < 0.4).astype(np.float32)
    labels_b = (rng.random((4, 5)) < 0.4).astype(np.float32)
    labels_a[0] = 0.0  # a row without labels
    similarity = label_similarity(torch.tensor(labels_a), torch.tensor(labels_b))
    np.testing.assert_allclose(similarity.numpy(), _reference_similarity(labels_a, labels_b), atol=1e-6)
    assert float(similarity.min()) >= 0.0 and float(similarity.max()) <= 1.0


def test_label_similarity_hand_computed_levels() -> None:
    labels = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    similarity = label_similarity(labels, labels)
    assert similarity[0, 0] == pytest.approx(1.0)
    assert similarity[0, 1] == pytest.approx(1 / math.sqrt(2))  # one of two labels shared
    assert similarity[0, 2] == 0.0  # nothing shared
    assert similarity[3].tolist() == [0.0, 0.0, 0.0, 0.0]  # no labels: similar to nothing, itself included


def test_label_similarity_one_hot_is_equality() -> None:
    classes = torch.tensor([0, 2, 2, 1])
    one_hot = torch.nn.functional.one_hot(classes, 3).float()
    expected = (classes[:, None] == classes[None, :]).float()
    assert torch.equal(label_similarity(one_hot, one_hot), expected)


# --- pairwise likelihood ------------------------------------------------------------------------


def _reference_likelihood(image: np.ndarray, text: np.ndarray, similarity: np.ndarray) -> float:
    total = 0.0
    for i in range(len(image)):
        for j in range(len(text)):
            theta = 0.5 * _dot(image[i], text[j])
            total += math.log1p(math.exp(theta)) - similarity[i, j] * theta
    return total / (len(image) * len(text))


@pytest.mark.parametrize(("rows_a", "rows_b", "width"), SHAPES)
def test_pairwise_likelihood_matches_double_loop(rows_a: int, rows_b: int, width: int) -> None:
    rng = np.random.default_rng(rows_a * 100 + width)
    image, text = rng.standard_normal((rows_a, width)), rng.standard_normal((rows_b, width))
    similarity = rng.random((rows_a, rows_b))
    image_t, text_t = _tensor(image, grad=True), _tensor(text, grad=True)
    loss = pairwise_likelihood_loss(image_t, text_t, _tensor(similarity))
    assert loss.item() == pytest.approx(_reference_likelihood(image, text, similarity), rel=1e-10)
    _assert_finite_gradients(loss, image_t, text_t)


@pytest.mark.parametrize("target", [0.0, 1.0])
def test_pairwise_likelihood_all_or_none_similar(target: float) -> None:
    rng = np.random.default_rng(3)
    image, text = np.tanh(rng.standard_normal((5, 8))), np.tanh(rng.standard_normal((4, 8)))
    similarity = np.full((5, 4), target)
    loss = pairwise_likelihood_loss(_tensor(image), _tensor(text), _tensor(similarity))
    assert loss.item() == pytest.approx(_reference_likelihood(image, text, similarity), rel=1e-10)


def test_pairwise_likelihood_is_stable_for_large_inner_products() -> None:
    image = torch.full((2, 64), 40.0, dtype=torch.float32, requires_grad=True)
    text = torch.full((3, 64), 40.0, dtype=torch.float32, requires_grad=True)
    # theta = 0.5 * 64 * 1600 = 51200: exp overflows, softplus does not; with S = 1 the loss is log1p(e^-theta) = 0.
    loss = pairwise_likelihood_loss(image, text, torch.ones(2, 3))
    assert loss.item() == pytest.approx(0.0, abs=1e-3)
    _assert_finite_gradients(loss, image, text)


# --- quantisation and bit balance ---------------------------------------------------------------


def _reference_quantization(codes: np.ndarray) -> float:
    total = 0.0
    for row in codes:
        for value in row:
            bit = 1.0 if value >= 0 else -1.0
            total += (bit - float(value)) ** 2
    return total / codes.size


def _reference_bit_balance(codes: np.ndarray) -> float:
    return sum(sum(float(value) for value in row) ** 2 / codes.shape[1] for row in codes) / len(codes)


@pytest.mark.parametrize(("rows", "_unused", "bits"), SHAPES)
def test_quantization_and_bit_balance_match_loops(rows: int, _unused: int, bits: int) -> None:
    rng = np.random.default_rng(rows + bits)
    codes = np.tanh(2 * rng.standard_normal((rows, bits)))
    codes[0, 0] = 0.0  # sign(0) counts as +1
    codes_t = _tensor(codes, grad=True)
    quantization = quantization_loss(codes_t)
    assert quantization.item() == pytest.approx(_reference_quantization(codes), rel=1e-10)
    _assert_finite_gradients(quantization, codes_t)
    balance = bit_balance_loss(_tensor(codes))
    assert balance.item() == pytest.approx(_reference_bit_balance(codes), rel=1e-10)


def test_quantization_zero_on_binary_codes_and_one_at_zero() -> None:
    binary = torch.tensor([[1.0, -1.0, 1.0], [-1.0, -1.0, 1.0]])
    assert float(quantization_loss(binary)) == 0.0
    assert float(quantization_loss(torch.zeros(2, 4))) == pytest.approx(1.0)


def test_bit_balance_hand_computed() -> None:
    balanced = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    constant = torch.ones(3, 8)
    assert float(bit_balance_loss(balanced)) == 0.0
    assert float(bit_balance_loss(constant)) == pytest.approx(8.0)  # (8)^2 / 8


# --- modality classifier and entropy ------------------------------------------------------------


def test_entropy_loss_zero_when_uncertain_log2_when_certain() -> None:
    uniform = torch.zeros(5, 2, requires_grad=True)
    assert modality_entropy_loss(uniform).item() == pytest.approx(0.0, abs=1e-7)
    certain = torch.tensor([[100.0, -100.0], [-100.0, 100.0]])
    assert float(modality_entropy_loss(certain)) == pytest.approx(math.log(2.0), abs=1e-6)
    _assert_finite_gradients(modality_entropy_loss(uniform), uniform)


@pytest.mark.parametrize("seed", [0, 1])
def test_entropy_loss_matches_loop(seed: int) -> None:
    logits = np.random.default_rng(seed).standard_normal((9, 2)) * 3
    expected = math.log(2.0)
    entropies = []
    for row in logits:
        probabilities = _softmax([float(value) for value in row])
        entropies.append(-sum(p * math.log(p) for p in probabilities))
    expected -= sum(entropies) / len(entropies)
    assert float(modality_entropy_loss(_tensor(logits))) == pytest.approx(expected, rel=1e-10)


def test_modality_classification_loss_matches_loop() -> None:
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((6, 2))
    modality = np.array([0, 1, 0, 1, 1, 0])
    expected = -sum(
        math.log(_softmax([float(value) for value in row])[label]) for row, label in zip(logits, modality, strict=True)
    ) / len(logits)
    loss = modality_classification_loss(_tensor(logits), torch.tensor(modality))
    assert loss.item() == pytest.approx(expected, rel=1e-10)


def test_modality_classifier_shapes_and_gradients() -> None:
    torch.manual_seed(0)
    classifier = ModalityClassifier(input_dim=16, hidden_dim=32)
    features = torch.randn(10, 16)
    logits = classifier(features)
    assert logits.shape == (10, 2)
    loss = modality_classification_loss(logits, torch.tensor([0, 1] * 5)) + modality_entropy_loss(logits)
    loss.backward()
    for name, parameter in classifier.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name


def test_modality_losses_reject_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        modality_entropy_loss(torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"modality \[N\]"):
        modality_classification_loss(torch.zeros(4, 2), torch.zeros(3, dtype=torch.int64))


# --- bi-directional ranking ---------------------------------------------------------------------


def _reference_ranking(images: np.ndarray, texts: np.ndarray, positive: np.ndarray, margin: float) -> float:
    scores = [[_dot(image, text) for text in texts] for image in images]
    total = 0.0
    for i in range(len(images)):
        for t in range(len(texts)):
            if not positive[i, t]:
                continue
            negative_texts = [scores[i][u] for u in range(len(texts)) if not positive[i, u]]
            negative_images = [scores[j][t] for j in range(len(images)) if not positive[j, t]]
            if negative_texts:
                total += max(0.0, margin - scores[i][t] + max(negative_texts))
            if negative_images:
                total += max(0.0, margin - scores[i][t] + max(negative_images))
    return total


def _unit_rows(rng: np.random.Generator, rows: int, width: int) -> np.ndarray:
    vectors = rng.standard_normal((rows, width))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _five_captions(images: int) -> np.ndarray:
    positive = np.zeros((images, images * 5), dtype=bool)
    for image in range(images):
        positive[image, image * 5 : image * 5 + 5] = True
    return positive


@pytest.mark.parametrize("margin", [0.0, 0.2, 1.5])
@pytest.mark.parametrize("layout", ["diagonal", "five_per_image", "random", "all_positive", "none_positive"])
def test_ranking_loss_matches_loop(margin: float, layout: str) -> None:
    rng = np.random.default_rng(len(layout))
    images = _unit_rows(rng, 4, 8)
    if layout == "diagonal":
        positive = np.eye(4, dtype=bool)
    elif layout == "five_per_image":
        positive = _five_captions(4)
    elif layout == "random":
        positive = rng.random((4, 7)) < 0.4
    elif layout == "all_positive":
        positive = np.ones((4, 6), dtype=bool)
    else:
        positive = np.zeros((4, 6), dtype=bool)
    texts = _unit_rows(rng, positive.shape[1], 8)
    images_t, texts_t = _tensor(images, grad=True), _tensor(texts, grad=True)
    loss = bidirectional_ranking_loss(images_t, texts_t, torch.tensor(positive), margin=margin)
    assert loss.item() == pytest.approx(_reference_ranking(images, texts, positive, margin), rel=1e-10, abs=1e-12)
    _assert_finite_gradients(loss, images_t, texts_t)
    if layout in ("all_positive", "none_positive"):
        assert loss.item() == 0.0  # no negatives, or no positive pair: nothing to rank


def _reference_ranking_all_negatives(
    images: np.ndarray, texts: np.ndarray, positive: np.ndarray, margin: float
) -> float:
    scores = [[_dot(image, text) for text in texts] for image in images]
    total = 0.0
    for i in range(len(images)):
        for t in range(len(texts)):
            if not positive[i, t]:
                continue
            for u in range(len(texts)):
                if not positive[i, u]:
                    total += max(0.0, margin - scores[i][t] + scores[i][u])
            for j in range(len(images)):
                if not positive[j, t]:
                    total += max(0.0, margin - scores[i][t] + scores[j][t])
    return total


@pytest.mark.parametrize("layout", ["diagonal", "five_per_image", "random", "none_positive"])
def test_ranking_loss_over_every_negative_matches_loop(layout: str) -> None:
    rng = np.random.default_rng(7 + len(layout))
    images = _unit_rows(rng, 4, 8)
    positive = {
        "diagonal": np.eye(4, dtype=bool),
        "five_per_image": _five_captions(4),
        "random": rng.random((4, 7)) < 0.4,
        "none_positive": np.zeros((4, 6), dtype=bool),
    }[layout]
    texts = _unit_rows(rng, positive.shape[1], 8)
    images_t, texts_t = _tensor(images, grad=True), _tensor(texts, grad=True)
    loss = bidirectional_ranking_loss(images_t, texts_t, torch.tensor(positive), margin=0.2, hardest=False)
    expected = _reference_ranking_all_negatives(images, texts, positive, 0.2)
    assert loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)
    _assert_finite_gradients(loss, images_t, texts_t)
    # Every negative's hinge is at least the hardest one's share: the sum bounds the hardest from above.
    hardest = bidirectional_ranking_loss(images_t, texts_t, torch.tensor(positive), margin=0.2)
    assert loss.item() >= hardest.item() - 1e-12


def test_ranking_loss_with_tied_scores() -> None:
    # Every score is 1: each hinge is exactly the margin, two directions per positive pair.
    images = torch.ones(3, 2) / math.sqrt(2)
    texts = torch.ones(3, 2) / math.sqrt(2)
    loss = bidirectional_ranking_loss(images, texts, torch.eye(3, dtype=torch.bool), margin=0.2)
    assert loss.item() == pytest.approx(3 * 2 * 0.2, rel=1e-6)


def test_ranking_loss_zero_when_positives_beat_negatives_by_margin() -> None:
    embeddings = torch.eye(4)
    loss = bidirectional_ranking_loss(embeddings, embeddings, torch.eye(4, dtype=torch.bool), margin=0.5)
    assert loss.item() == 0.0


# --- projection matching (CMPM) -----------------------------------------------------------------


def _reference_cmpm_direction(queries: np.ndarray, keys: np.ndarray, match: np.ndarray, epsilon: float) -> float:
    terms = []
    for row in range(len(queries)):
        row_total = float(match[row].sum())
        if row_total == 0:
            continue
        logits = [_dot(queries[row], key) / math.sqrt(_dot(key, key)) for key in keys]
        p = _softmax(logits)
        q = [float(value) / row_total for value in match[row]]
        terms.append(sum(p[k] * (math.log(p[k]) - math.log(q[k] + epsilon)) for k in range(len(keys))))
    return sum(terms) / len(terms) if terms else 0.0


def _reference_cmpm(images: np.ndarray, texts: np.ndarray, match: np.ndarray) -> float:
    epsilon = 1e-8
    return _reference_cmpm_direction(images, texts, match, epsilon) + _reference_cmpm_direction(
        texts, images, match.T, epsilon
    )


@pytest.mark.parametrize("layout", ["diagonal", "five_per_image", "random", "all_match", "with_unmatched_rows"])
def test_projection_matching_matches_loop(layout: str) -> None:
    rng = np.random.default_rng(len(layout) + 10)
    if layout == "diagonal":
        match = np.eye(5)
    elif layout == "five_per_image":
        match = _five_captions(3).astype(np.float64)
    elif layout == "random":
        match = (rng.random((4, 6)) < 0.5).astype(np.float64)
        match[0, 0] = 1.0
    elif layout == "all_match":
        match = np.ones((3, 4))
    else:
        match = np.zeros((4, 5))
        match[1, 2] = match[3, 0] = 1.0  # rows 0, 2 of images and columns 1, 3, 4 of texts unmatched
    images = rng.standard_normal((match.shape[0], 6))
    texts = rng.standard_normal((match.shape[1], 6))
    images_t, texts_t = _tensor(images, grad=True), _tensor(texts, grad=True)
    loss = projection_matching_loss(images_t, texts_t, torch.tensor(match))
    assert loss.item() == pytest.approx(_reference_cmpm(images, texts, match), rel=1e-9)
    _assert_finite_gradients(loss, images_t, texts_t)


def test_projection_matching_accepts_bool_match_and_empty_match_is_zero() -> None:
    rng = np.random.default_rng(7)
    images, texts = rng.standard_normal((3, 4)), rng.standard_normal((6, 4))
    match = _five_captions(3)[:, :6]
    as_bool = projection_matching_loss(_tensor(images), _tensor(texts), torch.tensor(match))
    as_float = projection_matching_loss(_tensor(images), _tensor(texts), torch.tensor(match, dtype=torch.float64))
    assert as_bool.item() == pytest.approx(as_float.item())
    images_t = _tensor(images, grad=True)
    empty = projection_matching_loss(images_t, _tensor(texts), torch.zeros(3, 6, dtype=torch.bool))
    assert empty.item() == 0.0
    _assert_finite_gradients(empty, images_t)


def test_projection_matching_spreads_target_over_five_sentences() -> None:
    # One image, five sentences identical to it: p is uniform over them, q too, so KL = 0.
    image = torch.tensor([[3.0, 0.0]])
    texts = torch.tensor([[1.0, 0.0]] * 5)
    loss = projection_matching_loss(image, texts, torch.ones(1, 5))
    image_to_text = _reference_cmpm_direction(image.numpy(), texts.numpy(), np.ones((1, 5)), 1e-8)
    assert image_to_text == pytest.approx(0.0, abs=1e-6)
    assert loss.item() == pytest.approx(_reference_cmpm(image.numpy(), texts.numpy(), np.ones((1, 5))), abs=1e-6)


# --- label calibration --------------------------------------------------------------------------


def _reference_calibration(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    terms = []
    for row, label_row in zip(logits, labels, strict=True):
        total = float(label_row.sum())
        if total == 0:
            continue
        p = _softmax([float(value) / temperature for value in row])
        q = [float(value) / total for value in label_row]
        terms.append(sum(q[c] * (math.log(q[c]) - math.log(p[c])) for c in range(len(q)) if q[c] > 0))
    return sum(terms) / len(terms) if terms else 0.0


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("rows", [1, 6])
def test_label_calibration_matches_loop(temperature: float, rows: int) -> None:
    rng = np.random.default_rng(rows)
    logits = rng.standard_normal((rows, 5)) * 2
    labels = (rng.random((rows, 5)) < 0.4).astype(np.float64)
    labels[0, 1] = 1.0
    if rows > 1:
        labels[-1] = 0.0  # an unlabelled row is ignored
    logits_t = _tensor(logits, grad=True)
    loss = label_calibration_loss(logits_t, _tensor(labels), temperature=temperature)
    assert loss.item() == pytest.approx(_reference_calibration(logits, labels, temperature), rel=1e-10)
    _assert_finite_gradients(loss, logits_t)


def test_label_calibration_all_rows_unlabelled_is_zero() -> None:
    logits = torch.randn(3, 4, requires_grad=True)
    loss = label_calibration_loss(logits, torch.zeros(3, 4), temperature=2.0)
    assert loss.item() == 0.0
    _assert_finite_gradients(loss, logits)


def test_label_calibration_rejects_bad_temperature() -> None:
    with pytest.raises(ValueError, match="temperature must be > 0"):
        label_calibration_loss(torch.zeros(2, 3), torch.ones(2, 3), temperature=0.0)


# --- shape errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: label_similarity(torch.zeros(2, 3), torch.zeros(2, 4)), "same width"),
        (lambda: pairwise_likelihood_loss(torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(4, 2)), r"\[2, 4\]"),
        (lambda: quantization_loss(torch.zeros(3)), "2-D"),
        (
            lambda: bidirectional_ranking_loss(torch.zeros(2, 3), torch.zeros(5, 3), torch.zeros(5, 2), margin=0.2),
            "positive",
        ),
        (lambda: projection_matching_loss(torch.zeros(2, 3), torch.zeros(5, 4), torch.zeros(2, 5)), "same width"),
        (
            lambda: label_calibration_loss(torch.zeros(2, 3), torch.zeros(2, 4), temperature=1.0),
            r"labels must be \[2, 3\]",
        ),
    ],
)
def test_losses_name_shape_mismatches(call: Callable[[], torch.Tensor], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()

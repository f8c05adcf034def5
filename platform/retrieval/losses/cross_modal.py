"""Cross-modal losses (thesis ch. 3 and 4; METHODS.md "Ch. 3", "Ch. 4"). Pure torch.

Ch. 3 (cross-modal hashing, Chen et al., ICME 2019): multi-level label similarity, the DCMH
pairwise likelihood loss with soft targets, quantisation and bit balance, and the modality
classifier with the information-entropy loss that the hashing nets minimise.

Ch. 4 (Chen et al., Pattern Recognition 117, 2021): the bi-directional ranking loss with hardest
negatives (VSE++), cross-modal projection matching (CMPM) with a KL divergence to the spread
target over the sentences of an image, and the temperature-scaled label calibration loss.

Every function validates shapes and raises `ValueError` naming them; where a batch holds no
term (no positive pair, no labelled row) the loss is a zero that still backpropagates.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F


def _check_matrix(name: str, tensor: torch.Tensor) -> None:
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor, got shape {list(tensor.shape)}")


def _check_pair(image_name: str, image: torch.Tensor, text_name: str, text: torch.Tensor) -> None:
    _check_matrix(image_name, image)
    _check_matrix(text_name, text)
    if image.shape[1] != text.shape[1]:
        raise ValueError(
            f"{image_name} and {text_name} must have the same width, got {list(image.shape)} and {list(text.shape)}"
        )


def _check_relation(name: str, relation: torch.Tensor, rows: int, cols: int) -> None:
    if tuple(relation.shape) != (rows, cols):
        raise ValueError(f"{name} must be [{rows}, {cols}], got shape {list(relation.shape)}")


def label_similarity(labels_a: torch.Tensor, labels_b: torch.Tensor) -> torch.Tensor:
    """Multi-level similarity `S_ij = <l_i, l_j> / (|l_i| |l_j|)`, the cosine of the label vectors.

    With multi-hot (non-negative) labels this lies in [0, 1]: pairs sharing more labels are more
    similar; one-hot labels give `1[y_i = y_j]`. A row without any label is similar to nothing (0).

    Args:
        labels_a: `[A, C]` multi-hot labels.
        labels_b: `[B, C]` multi-hot labels.

    Returns:
        `[A, B]` similarities in [0, 1].

    >>> label_similarity(torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    tensor([[0.7071, 0.0000]])
    """
    _check_pair("labels_a", labels_a, "labels_b", labels_b)
    unit_a = F.normalize(labels_a.float(), p=2, dim=1)
    unit_b = F.normalize(labels_b.float(), p=2, dim=1)
    # Rounding can push the cosine of identical rows a hair above 1.
    return (unit_a @ unit_b.T).clamp(0.0, 1.0)


def pairwise_likelihood_loss(image: torch.Tensor, text: torch.Tensor, similarity: torch.Tensor) -> torch.Tensor:
    """DCMH pairwise likelihood with soft targets (ch. 3).

    `theta_ij = 0.5 <h_I,i, h_T,j>`, `L = mean_ij( log(1 + exp(theta_ij)) - S_ij theta_ij )`; the
    softplus keeps it finite for large `|theta|`.

    Args:
        image: `[A, K]` image codes or features.
        text: `[B, K]` text codes or features.
        similarity: `[A, B]` targets `S_ij` in [0, 1].

    Returns:
        Scalar loss.
    """
    _check_pair("image", image, "text", text)
    _check_relation("similarity", similarity, image.shape[0], text.shape[0])
    theta = 0.5 * (image @ text.T)
    return (F.softplus(theta) - similarity.to(theta.dtype) * theta).mean()


def _binary_codes(codes: torch.Tensor) -> torch.Tensor:
    # b = sign(h) with 0 -> +1, the bit a packed code gives h >= 0; torch.sign(0) = 0 would
    # make h = 0 a free zero of the quantisation loss though it is no binary code.
    return torch.where(codes >= 0, torch.ones_like(codes), -torch.ones_like(codes))


def quantization_loss(codes: torch.Tensor) -> torch.Tensor:
    """Quantisation loss `mean_ik (b_ik - h_ik)^2`, `b = sign(h)` (0 counts as +1).

    Normalised by N * K (items times bits), so it does not grow with the code length and is the
    per-bit squared error: `|| b - h ||^2 / (N K)`.

    Args:
        codes: `[N, K]` relaxed codes `h` (tanh outputs).

    Returns:
        Scalar loss.
    """
    _check_matrix("codes", codes)
    return (_binary_codes(codes).detach() - codes).pow(2).mean()


def bit_balance_loss(codes: torch.Tensor) -> torch.Tensor:
    """Bit balance `mean_i (sum_k h_ik)^2 / K`: each code has as many +1 as -1 bits.

    Divided by K so the scale does not depend on the code length: a balanced code scores 0, a
    random +-1 code about 1 at any K (its bit sum has variance K), a constant code K.

    Args:
        codes: `[N, K]` relaxed codes.

    Returns:
        Scalar loss.
    """
    _check_matrix("codes", codes)
    return (codes.sum(dim=1).pow(2) / codes.shape[1]).mean()


def modality_entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """Information-entropy loss (ch. 3, the thesis' contribution): `log 2 - mean_i H(softmax(logits_i))`.

    Zero when the modality classifier is maximally uncertain (p = 0.5, 0.5), `log 2` when it is
    certain; the encoders minimise it.

    Args:
        logits: `[N, 2]` modality classifier logits.

    Returns:
        Scalar loss in [0, log 2].
    """
    _check_matrix("logits", logits)
    if logits.shape[1] != 2:
        raise ValueError(f"modality logits must be [N, 2], got shape {list(logits.shape)}")
    log_probabilities = F.log_softmax(logits, dim=1)
    entropy = -(log_probabilities.exp() * log_probabilities).sum(dim=1)
    return math.log(2.0) - entropy.mean()


def modality_classification_loss(logits: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the modality classifier on the true modality (image 0, text 1).

    Args:
        logits: `[N, 2]` logits.
        modality: `[N]` int64 in {0, 1}.

    Returns:
        Scalar loss.
    """
    _check_matrix("logits", logits)
    if logits.shape[1] != 2 or tuple(modality.shape) != (logits.shape[0],):
        raise ValueError(f"need logits [N, 2] and modality [N], got {list(logits.shape)} and {list(modality.shape)}")
    return F.cross_entropy(logits, modality.long())


def bidirectional_ranking_loss(
    images: torch.Tensor, texts: torch.Tensor, positive: torch.Tensor, *, margin: float, hardest: bool = True
) -> torch.Tensor:
    """Bi-directional hinge ranking loss with the hardest negatives in the batch (VSE++, ch. 4).

    Generalised to several texts per image: with `s(i, t) = <images_i, texts_t>`, for every
    positive pair (i, t)

        [m - s(i, t) + max_{t' not positive for i} s(i, t')]_+ + [m - s(i, t) + max_{i' not positive for t} s(i', t)]_+

    summed over positive pairs. A direction with no negative in the batch contributes 0.
    With `hardest=False` each max becomes a sum of the hinges over every negative (VSE0): the
    warm-up from random weights, where hardest negatives alone pull every embedding to one point.

    Args:
        images: `[B, D]` image embeddings (L2-normalised by the caller).
        texts: `[T, D]` text embeddings (L2-normalised by the caller).
        positive: `[B, T]` bool, text t describes image i.
        margin: m.
        hardest: the hardest negative only (VSE++), or every negative (VSE0).

    Returns:
        Scalar loss.
    """
    _check_pair("images", images, "texts", texts)
    _check_relation("positive", positive, images.shape[0], texts.shape[0])
    positive = positive.bool()
    scores = images @ texts.T
    if not hardest:
        weights = positive.to(scores.dtype)
        negative = (~positive).to(scores.dtype)
        # cost[i, t, t'] over every negative text t' of image i, and every negative image i' of text t.
        text_cost = (margin - scores.unsqueeze(2) + scores.unsqueeze(1)).clamp(min=0.0) * negative.unsqueeze(1)
        image_cost = (margin - scores.unsqueeze(0) + scores.unsqueeze(1)).clamp(min=0.0) * negative.unsqueeze(1)
        # image_cost[i', i, t] = hinge of positive (i, t) against negative image i' of t.
        return (text_cost.sum(dim=2) * weights).sum() + (image_cost.sum(dim=0) * weights).sum()
    negatives = scores.masked_fill(positive, float("-inf"))
    hardest_text = negatives.max(dim=1, keepdim=True).values  # [B, 1]
    hardest_image = negatives.max(dim=0, keepdim=True).values  # [1, T]
    # A row or column without negatives has max -inf: its hinge is clamped to 0 with zero gradient.
    text_cost = (margin - scores + hardest_text).clamp(min=0.0)
    image_cost = (margin - scores + hardest_image).clamp(min=0.0)
    return ((text_cost + image_cost) * positive.to(scores.dtype)).sum()


def _projection_kl(queries: torch.Tensor, keys: torch.Tensor, match: torch.Tensor, epsilon: float) -> torch.Tensor:
    """`mean_rows KL(softmax(<q, k/|k|>) || match / row sum)` over rows with at least one match."""
    logits = queries @ F.normalize(keys, p=2, dim=1).T
    log_p = F.log_softmax(logits, dim=1)
    row_total = match.sum(dim=1, keepdim=True)
    has_match = row_total.squeeze(1) > 0
    target = match / row_total.clamp(min=torch.finfo(match.dtype).tiny)
    per_row = (log_p.exp() * (log_p - torch.log(target + epsilon))).sum(dim=1)
    if not bool(has_match.any()):
        return logits.sum() * 0.0
    return per_row[has_match].mean()


def projection_matching_loss(
    images: torch.Tensor, texts: torch.Tensor, match: torch.Tensor, *, epsilon: float = 1e-8
) -> torch.Tensor:
    """Cross-modal projection matching with KL divergence (CMPM, Zhang & Lu 2018; ch. 4), both directions.

    Image -> text: `p_it = softmax_t(<f_I,i, f_T,t / |f_T,t|>)`, `q_it = y_it / sum_t' y_it'`,
    `L_I = mean_i KL(p_i || q_i) = mean_i sum_t p_it (log p_it - log(q_it + eps))`. Text -> image
    the same with the roles swapped (texts projected on normalised images, rows of `match.T`).
    Returns `L_I + L_T`. Because `q` spreads over all the sentences of an image, five captions
    per image do not count five times. Rows without any match are left out of their mean.

    Args:
        images: `[B, D]` image embeddings.
        texts: `[T, D]` text embeddings.
        match: `[B, T]` 1 (or True) where text t describes image i.
        epsilon: added inside the log of `q`, so the zeros of `q` give a large finite penalty.

    Returns:
        Scalar loss.
    """
    _check_pair("images", images, "texts", texts)
    _check_relation("match", match, images.shape[0], texts.shape[0])
    weights = match.to(images.dtype)
    return _projection_kl(images, texts, weights, epsilon) + _projection_kl(texts, images, weights.T, epsilon)


def label_calibration_loss(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """Imbalance-calibrated label loss (ch. 4): `mean_i KL(q_i || softmax(logits_i / T))`, `q_i = l_i / sum_c l_ic`.

    `0 log 0 = 0`; rows without any label are left out (all rows empty -> 0).

    Args:
        logits: `[N, C]` label classifier logits on the common space.
        labels: `[N, C]` multi-hot (or count) labels.
        temperature: T > 0.

    Returns:
        Scalar loss.
    """
    _check_matrix("logits", logits)
    _check_relation("labels", labels, logits.shape[0], logits.shape[1])
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    weights = labels.to(logits.dtype)
    row_total = weights.sum(dim=1, keepdim=True)
    has_label = row_total.squeeze(1) > 0
    if not bool(has_label.any()):
        return logits.sum() * 0.0
    target = weights[has_label] / row_total[has_label]
    log_p = F.log_softmax(logits[has_label] / temperature, dim=1)
    # xlogy gives 0 log 0 = 0 for the classes a row does not have.
    per_row = (torch.xlogy(target, target) - target * log_p).sum(dim=1)
    return per_row.mean()

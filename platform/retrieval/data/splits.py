"""Deterministic train/test splits of a labelled dataset, as index arrays.

Deep metric learning is evaluated on classes never seen in training (e.g. digits 0-4
for training and 5-9 for testing; CUB-200's first 100 classes vs the other 100), so
the class-disjoint splits are the default; the per-image split serves users who want
a closed-set evaluation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from retrieval.errors import DatasetError

_RANGE_PART = re.compile(r"^(\d+)(?:-(\d+))?$")


def parse_class_range(text: str) -> list[int]:
    """Parses class ids written as ranges and single ids: "0-4,7,9-10".

    Ranges are inclusive; whitespace around parts is ignored.

    Args:
        text: Comma-separated parts, each "a" or "a-b" with `0 <= a <= b`.

    Returns:
        The class ids, sorted and without duplicates.

    Raises:
        ValueError: The text is empty or a part is malformed; the message quotes `text`.

    >>> parse_class_range("0-4,7,9-10")
    [0, 1, 2, 3, 4, 7, 9, 10]
    """
    class_ids: set[int] = set()
    for part in text.split(","):
        match = _RANGE_PART.match(part.strip())
        if match is None:
            raise ValueError(
                f"bad class range {text!r}: part {part.strip()!r} is not 'a' or 'a-b' "
                f"with non-negative integers (example: '0-4,7,9-10')"
            )
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise ValueError(f"bad class range {text!r}: range {part.strip()!r} ends before it starts")
        class_ids.update(range(first, last + 1))
    return sorted(class_ids)


def _as_labels(labels: np.ndarray | Sequence[int]) -> np.ndarray:
    label_array = np.asarray(labels)
    if label_array.ndim != 1:
        raise DatasetError(f"labels must be one-dimensional [N], got shape {label_array.shape}")
    if label_array.size == 0:
        raise DatasetError("cannot split an empty dataset (labels is empty)")
    if not np.issubdtype(label_array.dtype, np.integer):
        raise DatasetError(f"labels must be integer class ids, got dtype {label_array.dtype}")
    return label_array.astype(np.int64)


def _check_fraction(train_fraction: float) -> None:
    if not 0.0 < train_fraction < 1.0:
        raise DatasetError(f"train_fraction must lie strictly between 0 and 1, got {train_fraction}")


def _indices_of_classes(labels: np.ndarray, classes: Sequence[int] | np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.isin(labels, np.asarray(classes, dtype=np.int64))).astype(np.int64)


def split_by_class_ranges(
    *,
    labels: np.ndarray | Sequence[int],
    train_classes: Sequence[int],
    test_classes: Sequence[int],
) -> tuple[np.ndarray, np.ndarray]:
    """Splits by naming the classes of each side (class-disjoint).

    Args:
        labels: Class ids `[N]`.
        train_classes: Class ids whose items form the train split.
        test_classes: Class ids whose items form the test split; must not overlap
            `train_classes`.

    Returns:
        `(train_indices [N_train], test_indices [N_test])`, int64, ascending.

    Raises:
        DatasetError: A side names no class, the sides overlap (the shared ids are
            named), or a class id has no item in `labels` (the id is named).
    """
    label_array = _as_labels(labels)
    present = set(np.unique(label_array).tolist())
    for side, classes in (("train_classes", train_classes), ("test_classes", test_classes)):
        if len(classes) == 0:
            raise DatasetError(f"{side} is empty: name at least one class id")
        unknown = sorted({int(class_id) for class_id in classes} - present)
        if unknown:
            raise DatasetError(
                f"{side} names class id(s) {unknown} that no image has; "
                f"the labels hold class ids {min(present)}..{max(present)}"
            )
    shared = sorted({int(class_id) for class_id in train_classes} & {int(class_id) for class_id in test_classes})
    if shared:
        raise DatasetError(f"train_classes and test_classes overlap in class id(s) {shared}")
    return _indices_of_classes(label_array, train_classes), _indices_of_classes(label_array, test_classes)


def split_by_class_fraction(
    *,
    labels: np.ndarray | Sequence[int],
    num_classes: int,
    train_fraction: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Splits the classes at random: `round(train_fraction * num_classes)` train classes.

    The class ids `0..num_classes-1` are shuffled with `seed`; the first classes are
    train, the rest test (class-disjoint).

    Args:
        labels: Class ids `[N]`, each in `[0, num_classes)`.
        num_classes: Number of class ids.
        train_fraction: Fraction of the classes used for training, in (0, 1).
        seed: Seed of the class shuffle.

    Returns:
        `(train_indices [N_train], test_indices [N_test])`, int64, ascending.

    Raises:
        DatasetError: A label is outside `[0, num_classes)`, the fraction is outside
            (0, 1), or either side gets no class or no image.
    """
    label_array = _as_labels(labels)
    _check_fraction(train_fraction)
    if label_array.min() < 0 or label_array.max() >= num_classes:
        raise DatasetError(
            f"labels must lie in [0, {num_classes}) for num_classes={num_classes}, "
            f"got range [{label_array.min()}, {label_array.max()}]"
        )
    num_train_classes = round(train_fraction * num_classes)
    if not 0 < num_train_classes < num_classes:
        raise DatasetError(
            f"train_fraction={train_fraction} of {num_classes} classes gives {num_train_classes} train "
            f"and {num_classes - num_train_classes} test classes: each side needs at least one"
        )
    shuffled = np.random.default_rng(seed).permutation(num_classes)
    train_indices = _indices_of_classes(label_array, shuffled[:num_train_classes])
    test_indices = _indices_of_classes(label_array, shuffled[num_train_classes:])
    if train_indices.size == 0 or test_indices.size == 0:
        empty_side = "train" if train_indices.size == 0 else "test"
        raise DatasetError(
            f"the {empty_side} split of train_fraction={train_fraction}, seed={seed} holds no image: "
            f"its classes have no items in labels"
        )
    return train_indices, test_indices


def split_by_image_fraction(
    *,
    labels: np.ndarray | Sequence[int],
    train_fraction: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Splits each class's images at random (stratified; NOT class-disjoint).

    Each class with `n` images gives `round(train_fraction * n)` images to train,
    clipped to `[1, n - 1]` when `n >= 2` so every such class appears on both sides; a
    class with one image goes to train.

    Args:
        labels: Class ids `[N]`.
        train_fraction: Fraction of each class's images used for training, in (0, 1).
        seed: Seed of the per-class shuffles.

    Returns:
        `(train_indices [N_train], test_indices [N_test])`, int64, ascending.

    Raises:
        DatasetError: The fraction is outside (0, 1) or the test split is empty.
    """
    label_array = _as_labels(labels)
    _check_fraction(train_fraction)
    rng = np.random.default_rng(seed)
    train_parts: list[np.ndarray] = []
    test_parts: list[np.ndarray] = []
    for class_id in np.unique(label_array):
        members = rng.permutation(np.flatnonzero(label_array == class_id))
        num_train = round(train_fraction * len(members))
        num_train = min(max(num_train, 1), max(len(members) - 1, 1))
        train_parts.append(members[:num_train])
        test_parts.append(members[num_train:])
    train_indices = np.sort(np.concatenate(train_parts)).astype(np.int64)
    test_indices = np.sort(np.concatenate(test_parts)).astype(np.int64)
    if test_indices.size == 0:
        raise DatasetError(f"train_fraction={train_fraction} leaves no test image: every class has a single image")
    return train_indices, test_indices

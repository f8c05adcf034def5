"""Train/test splits: disjointness, determinism, stratification and named errors."""

from __future__ import annotations

import re

import numpy as np
import pytest

from retrieval.data import (
    parse_class_range,
    split_by_class_fraction,
    split_by_class_ranges,
    split_by_image_fraction,
)
from retrieval.errors import DatasetError

# 10 classes with 3..12 items each, interleaved so class order differs from item order.
LABELS = np.concatenate([np.full(3 + class_id, class_id) for class_id in range(10)])
LABELS = LABELS[np.random.default_rng(1).permutation(len(LABELS))]


def _assert_partition(train: np.ndarray, test: np.ndarray, *, total: int) -> None:
    assert train.dtype == np.int64 and test.dtype == np.int64
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)
    assert np.intersect1d(train, test).size == 0
    assert len(train) + len(test) == total


def test_class_ranges_split_by_the_named_classes() -> None:
    train, test = split_by_class_ranges(labels=LABELS, train_classes=range(5), test_classes=[5, 6, 7, 8, 9])
    _assert_partition(train, test, total=len(LABELS))
    assert set(LABELS[train]) == {0, 1, 2, 3, 4}
    assert set(LABELS[test]) == {5, 6, 7, 8, 9}
    np.testing.assert_array_equal(train, [index for index, label in enumerate(LABELS) if label < 5])


def test_class_ranges_may_leave_classes_out() -> None:
    train, test = split_by_class_ranges(labels=LABELS, train_classes=[0], test_classes=[9])
    assert len(train) == 3 and len(test) == 12


def test_overlapping_class_ranges_name_the_shared_classes() -> None:
    with pytest.raises(DatasetError, match=r"overlap in class id\(s\) \[3, 4\]"):
        split_by_class_ranges(labels=LABELS, train_classes=[0, 1, 2, 3, 4], test_classes=[3, 4, 5])


def test_unknown_class_id_is_named() -> None:
    with pytest.raises(DatasetError, match=r"test_classes names class id\(s\) \[12\] that no image has; .*0\.\.9"):
        split_by_class_ranges(labels=LABELS, train_classes=[0], test_classes=[5, 12])


def test_empty_side_is_rejected() -> None:
    with pytest.raises(DatasetError, match="train_classes is empty"):
        split_by_class_ranges(labels=LABELS, train_classes=[], test_classes=[1])


def test_class_fraction_is_class_disjoint_and_deterministic() -> None:
    train, test = split_by_class_fraction(labels=LABELS, num_classes=10, train_fraction=0.6, seed=3)
    _assert_partition(train, test, total=len(LABELS))
    assert len(set(LABELS[train])) == 6 and len(set(LABELS[test])) == 4
    assert not set(LABELS[train]) & set(LABELS[test])
    again = split_by_class_fraction(labels=LABELS, num_classes=10, train_fraction=0.6, seed=3)
    np.testing.assert_array_equal(again[0], train)
    other_seeds = {
        tuple(
            sorted(
                set(LABELS[split_by_class_fraction(labels=LABELS, num_classes=10, train_fraction=0.6, seed=seed)[0]])
            )
        )
        for seed in range(5)
    }
    assert len(other_seeds) > 1


def test_class_fraction_uses_the_seeded_class_permutation() -> None:
    train, _ = split_by_class_fraction(labels=LABELS, num_classes=10, train_fraction=0.3, seed=7)
    expected_classes = np.random.default_rng(7).permutation(10)[:3]
    assert set(LABELS[train]) == set(expected_classes.tolist())


@pytest.mark.parametrize(
    ("fraction", "message"),
    [
        (0.04, "gives 0 train and 10 test classes"),
        (0.96, "gives 10 train and 0 test classes"),
        (1.0, "strictly between 0 and 1, got 1.0"),
    ],
)
def test_class_fraction_with_an_empty_side_is_an_error(fraction: float, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        split_by_class_fraction(labels=LABELS, num_classes=10, train_fraction=fraction, seed=0)


def test_class_fraction_whose_classes_have_no_images_is_an_error() -> None:
    with pytest.raises(DatasetError, match=r"split of train_fraction=0\.5, seed=0 holds no image"):
        split_by_class_fraction(labels=np.array([0, 0, 1]), num_classes=40, train_fraction=0.5, seed=0)


def test_class_fraction_rejects_labels_beyond_num_classes() -> None:
    with pytest.raises(DatasetError, match=r"labels must lie in \[0, 5\)"):
        split_by_class_fraction(labels=LABELS, num_classes=5, train_fraction=0.5, seed=0)


def test_image_fraction_is_stratified_per_class() -> None:
    train, test = split_by_image_fraction(labels=LABELS, train_fraction=0.5, seed=0)
    _assert_partition(train, test, total=len(LABELS))
    for class_id in range(10):
        size = 3 + class_id
        assert np.sum(LABELS[train] == class_id) == min(max(round(0.5 * size), 1), size - 1)
        assert np.sum(LABELS[test] == class_id) >= 1
    np.testing.assert_array_equal(split_by_image_fraction(labels=LABELS, train_fraction=0.5, seed=0)[1], test)
    assert not np.array_equal(split_by_image_fraction(labels=LABELS, train_fraction=0.5, seed=1)[1], test)


def test_image_fraction_keeps_a_test_image_per_class_even_at_high_fractions() -> None:
    _, test = split_by_image_fraction(labels=LABELS, train_fraction=0.99, seed=0)
    assert set(LABELS[test]) == set(range(10))


def test_image_fraction_of_single_image_classes_is_an_error() -> None:
    with pytest.raises(DatasetError, match="leaves no test image"):
        split_by_image_fraction(labels=np.array([0, 1, 2]), train_fraction=0.5, seed=0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0-4", [0, 1, 2, 3, 4]),
        ("0-4,7,9-10", [0, 1, 2, 3, 4, 7, 9, 10]),
        (" 5 , 1-2 ", [1, 2, 5]),
        ("3-3,3", [3]),
    ],
)
def test_parse_class_range(text: str, expected: list[int]) -> None:
    assert parse_class_range(text) == expected


@pytest.mark.parametrize("text", ["", "a-b", "4-0", "1,,2", "-3", "1-2-3", "1.5"])
def test_parse_class_range_rejects_bad_text_quoting_it(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"bad class range {text!r}")):
        parse_class_range(text)

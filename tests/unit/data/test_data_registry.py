"""build_datasets: the default digits protocol, the other split modes, and errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.data import DatasetSplits, build_datasets
from retrieval.errors import DatasetError

_DEFAULTS: dict[str, object] = {
    "root": None,
    "image_size": 16,
    "augment": True,
    "train_classes": None,
    "test_classes": None,
    "train_fraction": 0.5,
    "seed": 0,
}


def _build(**overrides: object) -> DatasetSplits:
    arguments = {**_DEFAULTS, **overrides}
    return build_datasets(**arguments)  # type: ignore[arg-type]


def test_digits_class_ranges_default_is_0_4_train_5_9_test() -> None:
    splits = _build(
        name="digits", split_mode="class_ranges", train_classes=[0, 1, 2, 3, 4], test_classes=[5, 6, 7, 8, 9]
    )
    assert set(splits.train.labels.tolist()) == {0, 1, 2, 3, 4}
    assert set(splits.test.labels.tolist()) == {5, 6, 7, 8, 9}
    assert len(splits.train) + len(splits.test) == 1797
    assert splits.test.class_names == [str(digit) for digit in range(10)]
    halves = _build(name="digits", split_mode="class_ranges")
    np.testing.assert_array_equal(halves.train.labels, splits.train.labels)
    np.testing.assert_array_equal(halves.test.labels, splits.test.labels)


def test_missing_side_of_class_ranges_is_the_complement() -> None:
    splits = _build(name="digits", split_mode="class_ranges", test_classes=[9])
    assert set(splits.train.labels.tolist()) == set(range(9))


def test_test_split_is_deterministic_and_train_split_augments() -> None:
    splits = _build(name="digits", split_mode="class_ranges")
    image, label, _ = splits.test[0]
    assert image.shape == (3, 16, 16) and label >= 5
    torch.testing.assert_close(splits.test[0][0], image)
    torch.manual_seed(0)
    assert not torch.equal(splits.train[0][0], splits.train[0][0])
    plain = _build(name="digits", split_mode="class_ranges", augment=False)
    torch.testing.assert_close(plain.train[0][0], plain.train.with_transform(splits.test.transform)[0][0])


def test_class_fraction_and_image_fraction_modes() -> None:
    by_class = _build(name="digits", split_mode="class_fraction", train_fraction=0.7, seed=1)
    assert len(set(by_class.train.labels.tolist())) == 7
    assert not set(by_class.train.labels.tolist()) & set(by_class.test.labels.tolist())
    by_image = _build(name="digits", split_mode="image_fraction", train_fraction=0.8, seed=1)
    assert set(by_image.train.labels.tolist()) == set(by_image.test.labels.tolist()) == set(range(10))
    assert len(by_image.train) + len(by_image.test) == 1797


def test_image_folder_needs_a_root() -> None:
    with pytest.raises(DatasetError, match="needs a root folder"):
        _build(name="image_folder", split_mode="class_ranges")


def test_image_folder_root_is_loaded(tmp_path: Path) -> None:
    for class_name in ("x", "y"):
        (tmp_path / class_name).mkdir()
        for position in range(2):
            Image.new("RGB", (4, 4), (position * 100, 0, 0)).save(tmp_path / class_name / f"{position}.png")
    splits = _build(name="image_folder", root=str(tmp_path), split_mode="class_ranges")
    assert splits.train.class_names == ["x", "y"]
    assert [splits.train.source(0), splits.test.source(1)] == [
        str(tmp_path / "x" / "0.png"),
        str(tmp_path / "y" / "1.png"),
    ]


def test_unknown_names_are_rejected() -> None:
    with pytest.raises(DatasetError, match="unknown dataset name 'mnist'"):
        _build(name="mnist", split_mode="class_ranges")
    with pytest.raises(DatasetError, match="unknown split_mode 'random'"):
        _build(name="digits", split_mode="random")

"""ImageDataset: items, subsets, transforms, pickling, and readable errors."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.data import (
    ArrayImageLoader,
    ImageDataset,
    eval_transform,
    read_image,
)
from retrieval.errors import CorruptImageError, DatasetError


def _dataset(*, transform: object = None) -> ImageDataset:
    pixels = [np.full((4, 4), fill_value=value, dtype=np.uint8) for value in (0, 60, 120, 180, 240)]
    return ImageDataset(
        loaders=[ArrayImageLoader(pixels=image) for image in pixels],
        labels=np.array([0, 1, 2, 1, 0]),
        class_names=["a", "b", "c"],
        sources=[f"memory:{index}" for index in range(5)],
        transform=transform,  # type: ignore[arg-type]
    )


def test_item_is_transformed_image_label_and_index() -> None:
    dataset = _dataset(transform=eval_transform(image_size=8, mean=(0, 0, 0), std=(1, 1, 1)))
    image, label, index = dataset[3]
    assert image.shape == (3, 8, 8)
    torch.testing.assert_close(image, torch.full((3, 8, 8), 180 / 255))
    assert (label, index) == (1, 3)
    assert len(dataset) == 5
    assert dataset.labels.dtype == np.int64
    assert dataset.class_names == ["a", "b", "c"]


def test_load_image_is_raw_and_source_names_the_item() -> None:
    dataset = _dataset()
    image = dataset.load_image(2)
    assert image.mode == "L" and image.size == (4, 4)
    assert np.asarray(image).max() == 120
    assert dataset.source(2) == "memory:2"
    assert dataset.source(-1) == "memory:4"


def test_subset_keeps_class_ids_names_and_transform() -> None:
    transform = eval_transform(image_size=8)
    dataset = _dataset(transform=transform)
    subset = dataset.subset(np.array([4, 1]))
    assert subset.labels.tolist() == [0, 1]
    assert subset.class_names == ["a", "b", "c"]
    assert [subset.source(0), subset.source(1)] == ["memory:4", "memory:1"]
    assert subset.transform is transform
    torch.testing.assert_close(subset[0][0], dataset[4][0])
    assert subset[0][2] == 0
    assert len(dataset.subset([])) == 0


def test_with_transform_returns_a_copy_and_leaves_the_original() -> None:
    dataset = _dataset()
    resized = dataset.with_transform(eval_transform(image_size=6))
    assert resized[0][0].shape == (3, 6, 6)
    assert dataset.transform is None
    with pytest.raises(DatasetError, match="has no transform"):
        dataset[0]


def test_labels_are_read_only() -> None:
    with pytest.raises(ValueError, match="read-only"):
        _dataset().labels[0] = 2


def test_out_of_range_index_raises_index_error() -> None:
    dataset = _dataset(transform=eval_transform(image_size=4))
    with pytest.raises(IndexError, match="index 5 is out of range for a dataset of 5 images"):
        dataset[5]
    with pytest.raises(IndexError):
        dataset.subset([0, 7])


def test_pickled_dataset_gives_the_same_items() -> None:
    dataset = _dataset(transform=eval_transform(image_size=8))
    restored = pickle.loads(pickle.dumps(dataset))
    assert restored.labels.tolist() == dataset.labels.tolist()
    torch.testing.assert_close(restored[2][0], dataset[2][0])


def test_dataloader_batches_items() -> None:
    loader = torch.utils.data.DataLoader(_dataset(transform=eval_transform(image_size=8)), batch_size=4)
    images, labels, indices = next(iter(loader))
    assert images.shape == (4, 3, 8, 8)
    assert labels.tolist() == [0, 1, 2, 1]
    assert indices.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"labels": np.array([0, 1])}, "same length, got 5, 2 and 5"),
        ({"labels": np.array([0, 1, 3, 1, 0])}, r"labels must lie in \[0, 3\)"),
        ({"labels": np.zeros((5, 1), dtype=np.int64)}, "one-dimensional"),
        ({"labels": np.array([0.0, 1, 2, 1, 0])}, "integer class ids"),
    ],
)
def test_inconsistent_construction_is_rejected(kwargs: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {
        "loaders": [ArrayImageLoader(pixels=np.zeros((2, 2), dtype=np.uint8))] * 5,
        "labels": np.array([0, 1, 2, 1, 0]),
        "class_names": ["a", "b", "c"],
        "sources": ["s"] * 5,
        "transform": None,
    }
    arguments.update(kwargs)
    with pytest.raises(DatasetError, match=message):
        ImageDataset(**arguments)  # type: ignore[arg-type]


def test_read_image_decodes_as_rgb(tmp_path: Path) -> None:
    path = tmp_path / "gray.png"
    Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4)).save(path)
    image = read_image(path)
    assert image.mode == "RGB"
    assert np.asarray(image)[1, 2].tolist() == [6, 6, 6]


def test_unreadable_images_name_the_file_and_the_reason(tmp_path: Path) -> None:
    with pytest.raises(CorruptImageError, match=r"cannot read image .*missing\.png: FileNotFoundError"):
        read_image(tmp_path / "missing.png")
    not_an_image = tmp_path / "upload.jpg"
    not_an_image.write_bytes(b"not an image at all")
    with pytest.raises(CorruptImageError, match=r"cannot read image .*upload\.jpg: UnidentifiedImageError"):
        read_image(not_an_image)


def test_truncated_image_fails_when_read_not_later(tmp_path: Path) -> None:
    path = tmp_path / "truncated.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CorruptImageError, match=re.escape(f"cannot read image {path}: OSError")):
        read_image(path)

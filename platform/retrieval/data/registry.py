"""Builds a job's train and test datasets from its (already validated) data settings."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from retrieval.data.base import ImageDataset
from retrieval.data.catalog import load_image_dataset
from retrieval.data.splits import (
    split_by_class_fraction,
    split_by_class_ranges,
    split_by_image_fraction,
)
from retrieval.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    eval_transform,
    train_transform,
)
from retrieval.errors import DatasetError

logger = logging.getLogger(__name__)

SplitMode = Literal["class_ranges", "class_fraction", "image_fraction"]
SPLIT_MODES: tuple[str, ...] = ("class_ranges", "class_fraction", "image_fraction")


@dataclass(frozen=True)
class DatasetSplits:
    """A job's datasets: `train` with the training transform, `test` with the eval one.

    `seen_test` (eval transform), when the split holds one out, is images of the training
    classes that training never sees (the catalogue-search protocol); else None.
    """

    train: ImageDataset
    test: ImageDataset
    seen_test: ImageDataset | None = None


def _class_range_indices(
    labels: np.ndarray,
    *,
    num_classes: int,
    train_classes: Sequence[int] | None,
    test_classes: Sequence[int] | None,
) -> tuple[np.ndarray, np.ndarray]:
    all_classes = list(range(num_classes))
    if train_classes is None:
        if test_classes is None:
            # The usual zero-shot protocol (digits 0-4 / 5-9, CUB 1-100 / 101-200, Cars 1-98 / 99-196).
            train_classes, test_classes = all_classes[: num_classes // 2], all_classes[num_classes // 2 :]
        else:
            excluded = set(test_classes)
            train_classes = [class_id for class_id in all_classes if class_id not in excluded]
    elif test_classes is None:
        excluded = set(train_classes)
        test_classes = [class_id for class_id in all_classes if class_id not in excluded]
    return split_by_class_ranges(labels=labels, train_classes=train_classes, test_classes=test_classes)


def build_datasets(
    *,
    name: str,
    root: str | None,
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    augment: bool,
    split_mode: SplitMode,
    train_classes: Sequence[int] | None,
    test_classes: Sequence[int] | None,
    train_fraction: float,
    seed: int,
    seen_test_fraction: float = 0.0,
) -> DatasetSplits:
    """Loads a dataset and splits it into a train and a test dataset.

    The train split gets `train_transform(augment=augment)`, the test split
    `eval_transform`; both keep the full dataset's class ids and class names.

    Args:
        name: A dataset of kind "image" in `retrieval.config.DATASETS`: "digits" (bundled,
            default protocol: classes 0-4 train, 5-9 test), "image_folder"
            (`root/<class>/<image>`), "cub200", "stanford_dogs", "stanford_cars" (each
            dataset's published layout; the default class_ranges split is their standard
            protocol, e.g. CUB classes 1-100 / 101-200), ...
        root: The dataset folder; required for every dataset but the bundled ones, which ignore it.
        image_size: Side of the square model input, in pixels.
        mean: Per-channel normalisation mean.
        std: Per-channel normalisation standard deviation.
        augment: Random crop/rotation on the train split.
        split_mode: "class_ranges" (`train_classes` / `test_classes`; when both are
            None the first half of the class ids trains and the second half tests, when
            one is None it is the complement of the other), "class_fraction" (random
            class-disjoint split) or "image_fraction" (per-class image split).
        train_classes: Class ids of the train split, for "class_ranges".
        test_classes: Class ids of the test split, for "class_ranges".
        train_fraction: Fraction of classes ("class_fraction") or of each class's
            images ("image_fraction") used for training.
        seed: Seed of the random split modes.
        seen_test_fraction: With a class-disjoint mode, this fraction of each training class's
            images (seeded by `seed`) is held out of `train` as `seen_test`; 0 holds none out.

    Returns:
        The train and test datasets.

    Raises:
        DatasetError: The name is unknown or not of an image dataset, the dataset cannot be
            read, or the split is invalid.
    """
    dataset = load_image_dataset(name, root=root)
    if split_mode == "class_ranges":
        train_indices, test_indices = _class_range_indices(
            dataset.labels, num_classes=dataset.num_classes, train_classes=train_classes, test_classes=test_classes
        )
    elif split_mode == "class_fraction":
        train_indices, test_indices = split_by_class_fraction(
            labels=dataset.labels, num_classes=dataset.num_classes, train_fraction=train_fraction, seed=seed
        )
    elif split_mode == "image_fraction":
        train_indices, test_indices = split_by_image_fraction(
            labels=dataset.labels, train_fraction=train_fraction, seed=seed
        )
    else:
        raise DatasetError(f"unknown split_mode {split_mode!r}; expected one of {list(SPLIT_MODES)}")
    seen_test = None
    if seen_test_fraction > 0:
        if split_mode == "image_fraction":
            raise DatasetError("seen_test_fraction applies to the class-disjoint split modes, not 'image_fraction'")
        kept, held_out = split_by_image_fraction(
            labels=dataset.labels[train_indices], train_fraction=1.0 - seen_test_fraction, seed=seed
        )
        train_indices, seen_indices = train_indices[kept], train_indices[held_out]
        seen_test = dataset.subset(seen_indices).with_transform(
            eval_transform(image_size=image_size, mean=mean, std=std)
        )
    logger.info(
        "dataset %s split %s: %d train images, %d test images, %d held-out images of the training classes",
        name,
        split_mode,
        len(train_indices),
        len(test_indices),
        0 if seen_test is None else len(seen_test),
    )
    return DatasetSplits(
        train=dataset.subset(train_indices).with_transform(
            train_transform(image_size=image_size, mean=mean, std=std, augment=augment)
        ),
        test=dataset.subset(test_indices).with_transform(eval_transform(image_size=image_size, mean=mean, std=std)),
        seen_test=seen_test,
    )

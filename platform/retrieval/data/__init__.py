"""Datasets, splits, batch samplers and the shared image transforms.

Every dataset is an `ImageDataset` of raw PIL images passed through one transform
(`eval_transform` or `train_transform`), which the search service reuses for uploads.
"""

from __future__ import annotations

from retrieval.data.base import (
    ArrayImageLoader,
    ImageDataset,
    ImageFileLoader,
    ImageLoader,
    read_image,
)
from retrieval.data.catalog import load_image_dataset
from retrieval.data.digits import load_digits_dataset
from retrieval.data.image_folder import IMAGE_EXTENSIONS, load_image_folder
from retrieval.data.registry import (
    SPLIT_MODES,
    DatasetSplits,
    SplitMode,
    build_datasets,
)
from retrieval.data.sampler import ClassBalancedBatchSampler
from retrieval.data.splits import (
    parse_class_range,
    split_by_class_fraction,
    split_by_class_ranges,
    split_by_image_fraction,
)
from retrieval.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageTransform,
    eval_transform,
    train_transform,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "SPLIT_MODES",
    "ArrayImageLoader",
    "ClassBalancedBatchSampler",
    "DatasetSplits",
    "ImageDataset",
    "ImageFileLoader",
    "ImageLoader",
    "ImageTransform",
    "SplitMode",
    "build_datasets",
    "eval_transform",
    "load_digits_dataset",
    "load_image_dataset",
    "load_image_folder",
    "parse_class_range",
    "read_image",
    "split_by_class_fraction",
    "split_by_class_ranges",
    "split_by_image_fraction",
    "train_transform",
]

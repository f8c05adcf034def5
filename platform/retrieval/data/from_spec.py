"""Builds a job's datasets from its validated `DatasetSpec`."""

from __future__ import annotations

from collections.abc import Sequence

from retrieval.config import DatasetSpec
from retrieval.data.registry import DatasetSplits, build_datasets
from retrieval.data.splits import parse_class_range


def datasets_from_spec(spec: DatasetSpec) -> DatasetSplits:
    """The train split (training transform) and test split (eval transform) of a job."""
    return build_datasets(
        name=spec.name,
        root=spec.root,
        image_size=spec.image_size,
        mean=spec.mean,
        std=spec.std,
        augment=spec.augment,
        split_mode=spec.split.mode,
        train_classes=_classes(spec.split.train_classes),
        test_classes=_classes(spec.split.test_classes),
        train_fraction=spec.split.train_fraction,
        seed=spec.split.seed,
    )


def _classes(value: str | Sequence[int] | None) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return parse_class_range(value)
    return list(value)

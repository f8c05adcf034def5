"""Builds a job's datasets from its validated `DatasetSpec`."""

from __future__ import annotations

from collections.abc import Sequence

from retrieval.config import DatasetSpec
from retrieval.data.landmarks import LandmarkBenchmark, load_landmark_benchmark
from retrieval.data.registry import DatasetSplits, build_datasets
from retrieval.data.splits import parse_class_range
from retrieval.data.transforms import landmark_transform
from retrieval.errors import DatasetError


def datasets_from_spec(spec: DatasetSpec) -> DatasetSplits:
    """The train split (training transform) and test split (eval transform) of a job.

    Raises:
        DatasetError: the dataset is a landmark benchmark (evaluated, never split for
            training), or cannot be read or split as specified.
    """
    if spec.kind == "landmark":
        raise DatasetError(
            f"dataset {spec.name!r} is a landmark benchmark (queries + database + ground truth): "
            "evaluate on it (retrieval evaluate), train on another dataset"
        )
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
        seen_test_fraction=spec.split.seen_test_fraction,
    )


def benchmark_from_spec(spec: DatasetSpec) -> LandmarkBenchmark:
    """A landmark benchmark with its queries and database preprocessed at `image_size` (longer side)."""
    if spec.kind != "landmark" or spec.root is None:
        raise DatasetError(f"dataset {spec.name!r} is not a landmark benchmark with a root folder")
    benchmark = load_landmark_benchmark(name=spec.name, root=spec.root)
    transform = landmark_transform(max_side=spec.image_size, mean=spec.mean, std=spec.std)
    return LandmarkBenchmark(
        name=benchmark.name,
        database=benchmark.database.with_transform(transform),
        queries=benchmark.queries.with_transform(transform),
        ground_truth=benchmark.ground_truth,
    )


def _classes(value: str | Sequence[int] | None) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return parse_class_range(value)
    return list(value)

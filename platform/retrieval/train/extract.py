"""Feature extraction fanned out over Ray workers: one task per contiguous range of the gallery.

Each task loads the model package itself, rebuilds the gallery from the job spec (so nothing
but paths and a spec travels to it), and streams its range into a part file with
`retrieval.index.extraction.extract_features`; the driver then merges the parts in order.
A task that dies is retried by Ray and simply rewrites its part.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from pathlib import Path
from typing import Any

import numpy as np
import ray

from retrieval.config import DatasetSpec
from retrieval.data.base import ImageDataset
from retrieval.errors import ConfigError
from retrieval.index.extraction import FeatureDtype, FeatureFile, extract_features, merge_parts, remove_parts
from retrieval.index.gallery import GalleryName, gallery_dataset
from retrieval.methods.package import ModelPackage, load_model_package

logger = logging.getLogger(__name__)


def contiguous_ranges(count: int, *, parts: int) -> list[tuple[int, int]]:
    """Split `[0, count)` into `parts` contiguous ranges whose sizes differ by at most one.

    >>> contiguous_ranges(10, parts=3)
    [(0, 3), (3, 6), (6, 10)]
    """
    if count < 1 or parts < 1:
        raise ValueError(f"need count >= 1 and parts >= 1, got count={count}, parts={parts}")
    parts = min(parts, count)
    bounds = [index * count // parts for index in range(parts + 1)]
    return list(itertools.pairwise(bounds))


def extract_features_distributed(
    *,
    package_dir: str | Path,
    out_dir: str | Path,
    num_workers: int,
    batch_size: int = 256,
    dtype: FeatureDtype = "float32",
    split: GalleryName = "test",
    dataset: DatasetSpec | None = None,
    limit: int | None = None,
    model: str | None = None,
    use_gpu: bool = False,
    loader_workers: int = 0,
) -> FeatureFile:
    """Extract the features of a gallery with `num_workers` Ray tasks, then merge them in order.

    Row `i` of the result is gallery item `i`, in the order `retrieval index` uses
    (`retrieval.index.gallery.gallery_dataset`), so features line up with index item ids.

    Args:
        package_dir: a model package folder (`save_model_package`), readable by every worker.
        out_dir: the output folder (see `retrieval.index.extraction`), readable and writable
            by every worker; part files an earlier run left there are removed first.
        num_workers: Ray tasks, each extracting one contiguous range (at most one per image).
        batch_size: images per batch in each task.
        dtype: "float32" or "float16".
        split: the gallery: the job's "test" split, "train" (eval transform) or "all" (train then test).
        dataset: the images to extract; None means the package's own job dataset. Its
            `image_size`, `mean` and `std` must be the package's, which preprocessing follows.
        limit: extract only the first `limit` gallery items (smoke runs, benchmarks).
        model: the model reference recorded in the manifest; default the package folder.
        use_gpu: give each task one GPU (`num_gpus=1`) and embed on it; otherwise one CPU.
        loader_workers: DataLoader worker processes inside each task.

    Returns:
        The merged features; `parts` holds each worker's range and images/s.

    Raises:
        ModelNotFoundError: `package_dir` is not a valid model package (checked before any task).
        ConfigError: `dataset` preprocesses images differently from the package.
        ValueError: `num_workers`, `batch_size` or `limit` below 1.
        IndexIntegrityError: the parts do not merge (see `merge_parts`).
    """
    if num_workers < 1 or batch_size < 1 or (limit is not None and limit < 1):
        raise ValueError(f"num_workers, batch_size and limit must be >= 1, got {num_workers}, {batch_size}, {limit}")
    package_path = Path(package_dir).resolve()
    folder = Path(out_dir).resolve()
    package = load_model_package(package_path)
    gallery = _limited(_gallery(package, dataset=dataset, split=split), limit=limit)
    source = _describe(package, dataset=dataset, split=split, count=len(gallery), limit=limit)
    ranges = contiguous_ranges(len(gallery), parts=num_workers)
    stale = remove_parts(folder)
    if stale:
        logger.info("%s: removed %d part files of an earlier extraction", folder, stale)

    if not ray.is_initialized():
        ray.init()
    task = _extract_range.options(num_cpus=1, num_gpus=1 if use_gpu else 0)
    pending = {
        task.remote(
            _RangeJob(
                package_dir=str(package_path),
                dataset=dataset.model_dump(mode="json") if dataset is not None else None,
                split=split,
                limit=limit,
                out_dir=str(folder),
                start=start,
                stop=stop,
                batch_size=batch_size,
                dtype=dtype,
                model=model or str(package_path),
                source=source,
                device="cuda" if use_gpu else "cpu",
                loader_workers=loader_workers,
            )
        ): (start, stop)
        for start, stop in ranges
    }
    logger.info("extracting %d images in %d ranges %s into %s", len(gallery), len(ranges), ranges, folder)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        start, stop = pending.pop(done[0])
        part: FeatureFile = ray.get(done[0])
        timing = part.parts[0]
        logger.info(
            "part [%d, %d) done: %d images in %.1f s, %.1f images/s (%d of %d parts left)",
            start,
            stop,
            timing.count,
            timing.seconds,
            timing.images_per_second,
            len(pending),
            len(ranges),
        )
    return merge_parts(folder)


@dataclasses.dataclass(frozen=True)
class _RangeJob:
    """What one task needs: paths, the dataset spec as JSON and its range; no model, no images."""

    package_dir: str
    dataset: dict[str, Any] | None
    split: GalleryName
    limit: int | None
    out_dir: str
    start: int
    stop: int
    batch_size: int
    dtype: FeatureDtype
    model: str
    source: dict[str, Any]
    device: str
    loader_workers: int


@ray.remote(max_retries=2)
def _extract_range(job: _RangeJob) -> FeatureFile:
    """One worker: load the package, rebuild the gallery, stream rows `[start, stop)` to a part file."""
    package = load_model_package(job.package_dir, device=job.device)
    dataset_spec = DatasetSpec.model_validate(job.dataset) if job.dataset is not None else None
    gallery = _limited(_gallery(package, dataset=dataset_spec, split=job.split), limit=job.limit)
    return extract_features(
        package.embed_tensor,
        gallery,
        out_dir=job.out_dir,
        batch_size=job.batch_size,
        model=job.model,
        source=job.source,
        dtype=job.dtype,
        start=job.start,
        stop=job.stop,
        progress=False,
        loader_workers=job.loader_workers,
    )


def _gallery(package: ModelPackage, *, dataset: DatasetSpec | None, split: GalleryName) -> ImageDataset:
    if dataset is None:
        return gallery_dataset(package, split)
    own = package.spec.dataset
    for field in ("image_size", "mean", "std"):
        if getattr(dataset, field) != getattr(own, field):
            raise ConfigError(
                f"dataset.{field} is {getattr(dataset, field)!r} but the model package was trained with "
                f"{getattr(own, field)!r}; features must be extracted with the model's own preprocessing"
            )
    respecified = dataclasses.replace(package, spec=package.spec.model_copy(update={"dataset": dataset}))
    return gallery_dataset(respecified, split)


def _limited(gallery: ImageDataset, *, limit: int | None) -> ImageDataset:
    if limit is None or limit >= len(gallery):
        return gallery
    return gallery.subset(np.arange(limit))


def _describe(
    package: ModelPackage, *, dataset: DatasetSpec | None, split: GalleryName, count: int, limit: int | None
) -> dict[str, Any]:
    return {
        "dataset": (dataset or package.spec.dataset).model_dump(mode="json"),
        "split": split,
        "count": count,
        "limit": limit,
        "job": package.spec.name,
    }

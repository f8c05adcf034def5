"""Embed a gallery with a trained model and write it as a sharded index version."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np

from retrieval.data.base import ImageDataset, concatenate_datasets
from retrieval.data.from_spec import datasets_from_spec
from retrieval.evaluation.runs import embed_dataset
from retrieval.index.manifest import ModelRef
from retrieval.index.shards import build_shards
from retrieval.methods.package import ModelPackage

logger = logging.getLogger(__name__)

GalleryName = Literal["test", "train", "all"]


def gallery_dataset(package: ModelPackage, gallery: GalleryName) -> ImageDataset:
    """The images to index, preprocessed exactly as the model's evaluation transform.

    `test` is the held-out split of the model's own job spec (the retrieval protocol);
    `all` is train followed by test.
    """
    splits = datasets_from_spec(package.spec.dataset)
    transform = package.preprocess()
    if gallery == "test":
        return splits.test
    if gallery == "train":
        return splits.train.with_transform(transform)
    return concatenate_datasets([splits.train.with_transform(transform), splits.test])


def build_gallery_index(
    package: ModelPackage,
    *,
    model: ModelRef,
    out_root: str | Path,
    gallery: GalleryName,
    num_shards: int,
    factory: str,
    metric: Literal["ip", "l2"],
    batch_size: int = 256,
) -> Path:
    """Embed the gallery with `package` and write a new index version; returns its manifest path.

    Item ids are positions in the gallery (deterministic for a given spec); each item's
    metadata keeps its label name and source, so results can be shown and traced.
    """
    dataset = gallery_dataset(package, gallery)
    logger.info("embedding %d gallery images with %s", len(dataset), model.uri)
    vectors = embed_dataset(
        lambda batch: package.method.embed(package.model, batch), dataset, batch_size=batch_size, device=package.device
    )
    names = dataset.class_names
    items = [
        {"label": names[label], "source": dataset.source(position)} for position, label in enumerate(dataset.labels)
    ]
    spec = package.spec
    return build_shards(
        vectors=vectors,
        ids=np.arange(len(dataset), dtype=np.int64),
        items=items,
        out_root=out_root,
        num_shards=num_shards,
        factory=factory,
        metric=metric,
        model=model,
        gallery={
            "dataset": spec.dataset.model_dump(mode="json"),
            "split": gallery,
            "count": len(dataset),
            "job": spec.name,
        },
    )

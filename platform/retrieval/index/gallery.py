"""Write a model's gallery as a sharded index version: one builder for every method.

What an index of a model holds is the method's own business (`RetrievalMethod.gallery`): an
image-retrieval model indexes images of its job's dataset (`retrieval.methods.gallery`); an
image-text model (thesis ch. 3-4) the images or the captions of its retrieval split, as
`IndexSpec.modality` says (`retrieval.methods.cross_modal_gallery`). The builder writes what it
gets the same way for every method: a hashing model's ±1 codes (``package.code_bits`` set) are
packed to bits and written as a binary index searched by Hamming distance, real-valued vectors
as a float index with the spec's metric.

A gallery of images also stores a small PNG thumbnail of each item's raw image (before the
model's transform) in the items files, for the search page; a gallery of texts has none.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
from PIL import Image

from retrieval.index.manifest import IndexMetric, Modality, ModelRef
from retrieval.index.shards import build_shards
from retrieval.methods.base import Gallery, GalleryName
from retrieval.methods.cross_modal_gallery import cross_modal_gallery_dataset, cross_modal_items
from retrieval.methods.gallery import gallery_dataset
from retrieval.methods.package import ModelPackage
from retrieval.models.codes import pack_codes

# Importable from here as before (the demo, `retrieval.train.extract`, benchmarks, tests).
__all__ = [
    "GalleryName",
    "RawImages",
    "build_cross_modal_index",
    "build_gallery_index",
    "cross_modal_gallery_dataset",
    "cross_modal_items",
    "gallery_dataset",
    "gallery_thumbnails",
    "thumbnail_png",
]

logger = logging.getLogger(__name__)


class RawImages(Protocol):
    """A dataset that gives each item's raw, untransformed image (`ImageDataset`, `CrossModalDataset`)."""

    def __len__(self) -> int: ...

    def load_image(self, index: int) -> Image.Image: ...


def thumbnail_png(image: Image.Image, *, size_px: int) -> bytes:
    """A PNG of ``image`` resized (aspect kept) so that its longer side is ``size_px`` pixels.

    Small images (digits are 8 x 8) are enlarged with nearest-neighbour sampling so their pixels
    stay sharp; larger ones are reduced with Lanczos filtering.

    Raises:
        ValueError: ``size_px`` < 1.
    """
    if size_px < 1:
        raise ValueError(f"size_px must be >= 1, got {size_px}")
    width, height = image.size
    scale = size_px / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if image.mode not in ("L", "LA", "RGB", "RGBA"):
        image = image.convert("RGB")
    resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
    buffer = io.BytesIO()
    image.resize(size, resample).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def gallery_thumbnails(dataset: RawImages, *, size_px: int) -> list[bytes | None] | None:
    """One PNG thumbnail per item of ``dataset`` (from its raw images), or None when ``size_px`` is 0."""
    if size_px == 0:
        return None
    logger.info("making %d gallery thumbnails of %d px", len(dataset), size_px)
    return [thumbnail_png(dataset.load_image(position), size_px=size_px) for position in range(len(dataset))]


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
    modality: Modality = "image",
    train_sample: int = 100_000,
    add_batch_size: int = 65_536,
    search_defaults: Mapping[str, int] | None = None,
    thumbnail_px: int = 64,
) -> Path:
    """Embed the model's gallery (`package.method.gallery`) and write a new index version.

    Item ids are positions in the gallery (deterministic for a given spec); each item keeps the
    metadata the method gives it (an image's label name and source; a caption and its image),
    so results can be shown and traced. A hashing model (``package.code_bits``) writes a binary
    index of its packed codes (metric "hamming", ``factory`` "Flat" meaning "BFlat"), whatever
    ``metric`` says; any other a float index with ``metric``.

    Args:
        gallery: which items: ``"test"`` (the held-out split; an image-text model's retrieval
            split), ``"train"`` or ``"all"``, as the method has them.
        modality: what the items are, ``"image"`` or ``"text"`` (a model that embeds texts).
        train_sample, add_batch_size, search_defaults: passed to `build_shards`.
        thumbnail_px: a gallery of images stores a PNG thumbnail per item whose longer side is
            this many pixels, made from the raw image (before the model's transform); 0 stores none.

    Returns:
        The path of the new version's ``manifest.json``.

    Raises:
        ConfigError: a ``modality`` the model does not embed, or a ``gallery`` its dataset does
            not have (nothing is written).
        ValueError: a hashing model's codes are not ``code_bits`` wide.
    """
    content = package.method.gallery(package, gallery, modality=modality, batch_size=batch_size)
    return write_gallery_index(
        content,
        job=package.spec.name,
        code_bits=package.code_bits,
        model=model,
        out_root=out_root,
        num_shards=num_shards,
        factory=factory,
        metric=metric,
        train_sample=train_sample,
        add_batch_size=add_batch_size,
        search_defaults=search_defaults,
        thumbnail_px=thumbnail_px,
    )


def write_gallery_index(
    content: Gallery,
    *,
    job: str,
    code_bits: int | None,
    model: ModelRef,
    out_root: str | Path,
    num_shards: int,
    factory: str,
    metric: Literal["ip", "l2"],
    train_sample: int = 100_000,
    add_batch_size: int = 65_536,
    search_defaults: Mapping[str, int] | None = None,
    thumbnail_px: int = 64,
) -> Path:
    """Write a method's gallery as a new index version, the same way for every method; returns its manifest path.

    ``code_bits`` set (a hashing model): the ±1 codes are packed and searched by Hamming distance.
    Thumbnails come from ``content.thumbnails_from`` (``thumbnail_px`` 0: none); the manifest's
    ``gallery`` record is the method's description plus ``job``.
    """
    vectors: np.ndarray = content.vectors
    index_metric: IndexMetric = metric
    bits = code_bits
    if bits is not None:
        if vectors.shape[1] != bits:
            raise ValueError(f"the model gave {vectors.shape[1]}-dim codes, it declares {bits} bits")
        vectors = pack_codes(vectors)
        index_metric = "hamming"
    thumbnails = (
        None if content.thumbnails_from is None else gallery_thumbnails(content.thumbnails_from, size_px=thumbnail_px)
    )
    return build_shards(
        vectors=vectors,
        ids=np.arange(len(content.items), dtype=np.int64),
        items=content.items,
        out_root=out_root,
        num_shards=num_shards,
        factory=factory,
        metric=index_metric,
        model=model,
        modality=content.modality,
        train_sample=train_sample,
        add_batch_size=add_batch_size,
        search_defaults=search_defaults,
        thumbnails=thumbnails,
        gallery={**content.description, "job": job},
    )


# The name of the builder of image-text galleries before there was one builder for every method.
build_cross_modal_index = build_gallery_index

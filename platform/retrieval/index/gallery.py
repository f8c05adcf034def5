"""Embed a gallery with a trained model and write it as a sharded index version.

Image-retrieval models index images of their job's dataset. Cross-modal models (thesis ch. 3-4)
index the retrieval split of their image-text dataset, either its images (one item per image)
or its texts (one item per caption), as `IndexSpec.modality` says; queries of either modality
then search it. A hashing model's ±1 codes are packed to bits and written as a binary index
searched by Hamming distance; a real-valued one's embeddings as a float index.

Image galleries also store a small PNG thumbnail of each item's raw image (before the model's
transform) in the items files, for the search page; text galleries have none.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from PIL import Image

from retrieval.data.base import ImageDataset, concatenate_datasets
from retrieval.data.cross_modal import CrossModalDataset, cross_modal_datasets_from_spec
from retrieval.data.from_spec import datasets_from_spec
from retrieval.errors import ConfigError
from retrieval.evaluation.runs import embed_dataset
from retrieval.index.manifest import IndexMetric, Modality, ModelRef
from retrieval.index.shards import build_shards
from retrieval.methods.package import ModelPackage
from retrieval.models.codes import pack_codes

logger = logging.getLogger(__name__)

GalleryName = Literal["test", "train", "all"]


def gallery_dataset(package: ModelPackage, gallery: GalleryName) -> ImageDataset:
    """The images to index, preprocessed exactly as the model's evaluation transform.

    `test` is the held-out split of the model's own job spec (the retrieval protocol);
    `all` is train followed by test (then the held-out images of the training classes, when
    the split has them).
    """
    splits = datasets_from_spec(package.spec.dataset)
    transform = package.preprocess()
    if gallery == "test":
        return splits.test
    if gallery == "train":
        return splits.train.with_transform(transform)
    parts = [splits.train.with_transform(transform), splits.test]
    if splits.seen_test is not None:
        parts.append(splits.seen_test)
    return concatenate_datasets(parts)


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
    """Embed the gallery with `package` and write a new index version; returns its manifest path.

    Item ids are positions in the gallery (deterministic for a given spec); each item's
    metadata keeps its label name and source, so results can be shown and traced.

    For a cross-modal package see `build_cross_modal_index` (``gallery`` "test" is the
    retrieval split; ``modality`` picks images or texts; a hashing model gets a hamming index
    whatever ``metric`` says). An image-only package indexes images only.

    Args:
        train_sample, add_batch_size, search_defaults: passed to `build_shards`.
        thumbnail_px: image galleries store a PNG thumbnail per item whose longer side is this
            many pixels, made from the raw image (before the model's transform); 0 stores none.

    Raises:
        ConfigError: ``modality`` "text" for an image-only model, or a gallery a cross-modal
            dataset does not have.
    """
    if package.embeds_texts:
        return build_cross_modal_index(
            package,
            model=model,
            out_root=out_root,
            gallery=gallery,
            num_shards=num_shards,
            factory=factory,
            metric=metric,
            batch_size=batch_size,
            modality=modality,
            train_sample=train_sample,
            add_batch_size=add_batch_size,
            search_defaults=search_defaults,
            thumbnail_px=thumbnail_px,
        )
    if modality != "image":
        raise ConfigError(
            f"index modality {modality!r} needs a cross-modal model, but {model.uri} "
            f"(method {package.spec.method.name!r}) embeds images only"
        )
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
        train_sample=train_sample,
        add_batch_size=add_batch_size,
        search_defaults=search_defaults,
        thumbnails=gallery_thumbnails(dataset, size_px=thumbnail_px),
        gallery={
            "dataset": spec.dataset.model_dump(mode="json"),
            "split": gallery,
            "count": len(dataset),
            "job": spec.name,
        },
    )


def cross_modal_gallery_dataset(package: ModelPackage, gallery: GalleryName) -> CrossModalDataset:
    """The image-text items a cross-modal model indexes: ``"test"`` is the retrieval split.

    Raises:
        ConfigError: ``gallery`` "all": the retrieval split already holds the training items
            of the tag datasets' protocol, so "all" would index them twice.
    """
    splits = cross_modal_datasets_from_spec(package.spec.dataset)
    if gallery == "test":
        return splits.retrieval
    if gallery == "train":
        return splits.train.with_transform(package.preprocess())
    raise ConfigError(
        f"gallery {gallery!r} is not available for the cross-modal dataset {package.spec.dataset.name!r}: "
        "index 'test' (its retrieval split) or 'train'"
    )


def _label_names_of(dataset: CrossModalDataset) -> list[list[str]] | None:
    labels = dataset.labels
    if labels is None:
        return None
    names = dataset.label_names
    return [[names[column] for column in np.flatnonzero(row > 0).tolist()] for row in labels]


def cross_modal_items(dataset: CrossModalDataset, *, modality: Modality) -> tuple[list[dict[str, Any]], list[str]]:
    """The item metadata of a cross-modal gallery, and its texts when ``modality`` is "text".

    Args:
        dataset: the gallery (e.g. the retrieval split).
        modality: ``"image"``: one item per image ``{"source", "captions", "labels"?}``;
            ``"text"``: one item per caption ``{"caption", "owner", "source", "labels"?}``
            (``owner`` the position of its image in ``dataset``, ``source`` that image's).
            ``labels`` (label names) only where the dataset has labels.

    Returns:
        ``(items [M], texts [M])``; ``texts`` is empty for images.
    """
    label_names = _label_names_of(dataset)
    if modality == "image":
        items: list[dict[str, Any]] = []
        for position, captions in enumerate(dataset.captions):
            item: dict[str, Any] = {"source": dataset.source(position), "captions": captions}
            if label_names is not None:
                item["labels"] = label_names[position]
            items.append(item)
        return items, []
    texts, owners = dataset.texts()
    items = []
    for text, owner in zip(texts, owners.tolist(), strict=True):
        item = {"caption": text, "owner": owner, "source": dataset.source(owner)}
        if label_names is not None:
            item["labels"] = label_names[owner]
        items.append(item)
    return items, texts


def _embed_images(package: ModelPackage, dataset: CrossModalDataset, *, batch_size: int) -> np.ndarray:
    chunks = [
        package.embed_images(
            [dataset.load_image(position) for position in range(start, min(start + batch_size, len(dataset)))],
            batch_size=batch_size,
        )
        for start in range(0, len(dataset), batch_size)
    ]
    return np.concatenate(chunks)


def cross_modal_vectors(
    package: ModelPackage, dataset: CrossModalDataset, texts: Sequence[str], *, modality: Modality, batch_size: int
) -> np.ndarray:
    """The gallery's vectors as the index stores them.

    Returns:
        Packed codes ``uint8 [M, bits / 8]`` for a hashing model (``package.code_bits`` set),
        else float32 embeddings ``[M, D]``.
    """
    if modality == "image":
        vectors = _embed_images(package, dataset, batch_size=batch_size)
    else:
        vectors = package.embed_texts(list(texts), batch_size=batch_size)
    if package.code_bits is not None:
        if vectors.shape[1] != package.code_bits:
            raise ValueError(f"the model gave {vectors.shape[1]}-dim codes, it declares {package.code_bits} bits")
        return pack_codes(vectors)
    return np.asarray(vectors, dtype=np.float32)


def build_cross_modal_index(
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
    """Embed a cross-modal gallery (images or captions) and write a new index version.

    Item ids are positions in the image list, or in the flattened caption list (`texts()`
    order) for ``modality`` "text". A hashing model (``package.code_bits``) writes a binary
    index of its packed codes (metric "hamming", ``factory`` "Flat" meaning "BFlat"); a
    real-valued one a float index with ``metric``. A gallery of images stores a thumbnail of
    each (``thumbnail_px``, 0 for none); a gallery of texts none.

    Returns:
        The path of the new version's ``manifest.json``.
    """
    dataset = cross_modal_gallery_dataset(package, gallery)
    items, texts = cross_modal_items(dataset, modality=modality)
    logger.info("embedding %d gallery %ss with %s", len(items), modality, model.uri)
    vectors = cross_modal_vectors(package, dataset, texts, modality=modality, batch_size=batch_size)
    index_metric: IndexMetric = "hamming" if package.code_bits is not None else metric
    spec = package.spec
    return build_shards(
        vectors=vectors,
        ids=np.arange(len(items), dtype=np.int64),
        items=items,
        out_root=out_root,
        num_shards=num_shards,
        factory=factory,
        metric=index_metric,
        model=model,
        modality=modality,
        train_sample=train_sample,
        add_batch_size=add_batch_size,
        search_defaults=search_defaults,
        thumbnails=gallery_thumbnails(dataset, size_px=thumbnail_px) if modality == "image" else None,
        gallery={
            "dataset": spec.dataset.model_dump(mode="json"),
            "split": "retrieval" if gallery == "test" else gallery,
            "modality": modality,
            "count": len(items),
            "images": len(dataset),
            "code_bits": package.code_bits,
            "job": spec.name,
        },
    )

"""The gallery of an image-text model (thesis ch. 3-4): the images or the captions of its retrieval split.

`CrossModalMethod.gallery` returns `cross_modal_gallery`: one item per image, or one per
caption, as the index's modality says; queries of either modality then search it. A hashing
model's items are its ±1 codes (float32 `[M, bits]`; the index builder packs them into a
binary index searched by Hamming distance), a real-valued one's its unit embeddings.
Only images carry thumbnails.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.data.cross_modal import CrossModalDataset, cross_modal_datasets_from_spec
from retrieval.errors import ConfigError
from retrieval.methods.base import Gallery, GalleryName, Modality

if TYPE_CHECKING:
    from retrieval.methods.base import RetrievalMethod
    from retrieval.methods.cross_modal import CrossModalMethod
    from retrieval.methods.package import ModelPackage

logger = logging.getLogger(__name__)


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
    """The images of ``dataset`` embedded ``batch_size`` at a time (raw images, the package's transform)."""
    chunks = [
        package.embed_images(
            [dataset.load_image(position) for position in range(start, min(start + batch_size, len(dataset)))],
            batch_size=batch_size,
        )
        for start in range(0, len(dataset), batch_size)
    ]
    return np.concatenate(chunks)


def cross_modal_gallery(
    method: CrossModalMethod | RetrievalMethod,
    package: ModelPackage,
    gallery: GalleryName,
    *,
    modality: Modality,
    batch_size: int,
) -> Gallery:
    """The images or the captions of a cross-modal model's dataset, embedded by the package.

    Item ids are positions in the image list, or in the flattened caption list (`texts()`
    order) for ``modality`` "text".

    Args:
        method: the package's method (named in the log).
        package: the loaded model (`embed_images`, `embed_texts`, `code_bits`, `spec`).
        gallery: ``"test"`` the retrieval split, or ``"train"``.
        modality: ``"image"`` one item per image (with thumbnails), ``"text"`` one per caption.
        batch_size: items embedded at a time.

    Returns:
        Vectors float32 ``[M, D]`` (the ±1 codes ``[M, bits]`` of a hashing model), the items of
        `cross_modal_items`, and the description ``{"dataset", "split", "modality", "count",
        "images", "code_bits"}`` (``split`` "retrieval" for ``gallery`` "test").

    Raises:
        ConfigError: ``gallery`` "all" (see `cross_modal_gallery_dataset`).
    """
    dataset = cross_modal_gallery_dataset(package, gallery)
    items, texts = cross_modal_items(dataset, modality=modality)
    logger.info("embedding %d gallery %ss with %s (method %s)", len(items), modality, package.source, method.name)
    if modality == "image":
        vectors = _embed_images(package, dataset, batch_size=batch_size)
    else:
        vectors = package.embed_texts(texts, batch_size=batch_size)
    return Gallery(
        vectors=np.asarray(vectors, dtype=np.float32),
        items=items,
        thumbnails_from=dataset if modality == "image" else None,
        description={
            "dataset": package.spec.dataset.model_dump(mode="json"),
            "split": "retrieval" if gallery == "test" else gallery,
            "modality": modality,
            "count": len(items),
            "images": len(dataset),
            "code_bits": package.code_bits,
        },
        modality=modality,
    )

"""The image gallery: what an index of an image-retrieval model holds (`RetrievalMethod.gallery`'s default).

An image model indexes images of its own job's dataset, preprocessed exactly as its evaluation
transform: one item per image, `{"label", "source"}`, its vector the method's `embed` of it.
The index builder (`retrieval.index.gallery.build_gallery_index`) asks the method for its
`gallery`, and the one writer (`write_gallery_index`) writes it the same way for every method.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from retrieval.data.base import ImageDataset, concatenate_datasets
from retrieval.data.from_spec import datasets_from_spec
from retrieval.evaluation.runs import embed_dataset
from retrieval.methods.base import Gallery, GalleryName

if TYPE_CHECKING:
    from retrieval.methods.package import ModelPackage

logger = logging.getLogger(__name__)


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


def image_gallery(package: ModelPackage, gallery: GalleryName, *, batch_size: int) -> Gallery:
    """The `gallery` split of the package's job dataset, embedded by its method.

    Item `i` is the dataset's image `i`: its vector the method's `embed` (float32 `[N, D]`), its
    metadata `{"label": class name, "source"}`; thumbnails are drawn from the same dataset's raw
    images. The description is `{"dataset", "split", "count"}`.
    """
    dataset = gallery_dataset(package, gallery)
    logger.info("embedding %d gallery images with %s", len(dataset), package.source)
    vectors = embed_dataset(
        lambda batch: package.method.embed(package.model, batch), dataset, batch_size=batch_size, device=package.device
    )
    names = dataset.class_names
    items = [
        {"label": names[label], "source": dataset.source(position)} for position, label in enumerate(dataset.labels)
    ]
    return Gallery(
        vectors=vectors,
        items=items,
        thumbnails_from=dataset,
        description={
            "dataset": package.spec.dataset.model_dump(mode="json"),
            "split": gallery,
            "count": len(dataset),
        },
        modality="image",
    )

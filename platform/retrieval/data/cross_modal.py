"""Image-text datasets (thesis ch. 3-4) and their query / retrieval / train splits.

A `CrossModalDataset` holds, per image, a lazy image loader, its texts (1..5 captions;
for tag-only data one text made of its tag words), an optional tag vector `[V]` and an
optional multi-hot label vector `[C]`. Like `ImageDataset`, it shares its loaders with
its subsets and re-transformed copies, so it pickles cheaply into data and Ray workers.

`cross_modal_datasets_from_spec` loads the dataset a `DatasetSpec` names and splits it:

- tag datasets (`digit_pairs`, `mirflickr25k`, `nus_wide`), the DCMH protocol:
  `query_size` random queries, the rest is the retrieval set, `train_size` training items
  drawn from the retrieval set (all seeded by `cross_modal.seed`); a `.mat` packaging with
  its own query / retrieval / train parts keeps them;
- caption datasets (`flickr30k`, `coco`), the Karpathy split of their JSON: train (+
  restval when `cross_modal.restval`) trains, the test images are both the queries and
  the retrieval set (COCO: the 5k test images, or fold `coco_fold` of five 1k folds).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np
import torch
from PIL import Image

from retrieval.config import DatasetSpec
from retrieval.data.base import ImageLoader
from retrieval.data.catalog import load_image_text_dataset
from retrieval.data.transforms import ImageTransform, eval_transform, train_transform
from retrieval.errors import DatasetError

logger = logging.getLogger(__name__)


def _optional_matrix(values: np.ndarray | None, *, name: str, num_items: int) -> np.ndarray | None:
    if values is None:
        return None
    matrix = np.asarray(values)
    if matrix.ndim != 2 or matrix.shape[0] != num_items:
        raise DatasetError(f"{name} must have shape [N, D] with N = {num_items} images, got shape {matrix.shape}")
    if matrix.size and not np.isfinite(matrix).all():
        raise DatasetError(f"{name} holds non-finite values (NaN or inf)")
    result = np.ascontiguousarray(matrix, dtype=np.float32)
    result.flags.writeable = False
    return result


class CaptionView(Sequence[list[str]]):
    """A read-only view of a dataset's captions: `view[i]` is a new list of image i's texts.

    Indexing costs one image's texts, not a copy of all N (a training step reads the
    captions of a batch this way); it compares equal to any sequence of the same lists.
    """

    def __init__(self, captions: tuple[tuple[str, ...], ...]) -> None:
        self._captions = captions

    def __len__(self) -> int:
        return len(self._captions)

    @overload
    def __getitem__(self, index: int) -> list[str]: ...

    @overload
    def __getitem__(self, index: slice) -> list[list[str]]: ...

    def __getitem__(self, index: int | slice) -> list[str] | list[list[str]]:
        if isinstance(index, slice):
            return [list(texts) for texts in self._captions[index]]
        return list(self._captions[index])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str) or len(other) != len(self):
            return False
        return all(list(mine) == list(theirs) for mine, theirs in zip(self._captions, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"CaptionView({[list(texts) for texts in self._captions]!r})"


class CrossModalDataset(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    """Images with their texts, tag vectors and multi-hot labels; items go through one transform.

    Item `i` is `(transform(load_image(i)), i)`: a float tensor `[3, H, W]` and the item's
    index, which selects its texts, tags and labels from this dataset.

    Args:
        loaders: One zero-argument callable per image, returning the raw PIL image `[N]`.
        captions: The texts of each image `[N]`, each a non-empty list of strings (1..5
            sentences; for tag-only data one text made of its tag words, "" when it has none).
        tags: Tag / bag-of-words vectors `[N, V]` (stored float32), or None (caption datasets).
        labels: Multi-hot category vectors `[N, C]` (stored float32), or None where the dataset
            has no categories (Flickr30K, COCO captions).
        label_names: Name of each label column `[C]` (empty when `labels` is None).
        tag_names: Name of each tag column `[V]` (empty when `tags` is None).
        sources: Where each image comes from (a file path, or e.g. "digit_pairs:3:12-40") `[N]`.
        transform: Maps a PIL image to a tensor `[3, H, W]`; None serves raw images only.

    Raises:
        DatasetError: The lengths disagree, an image has no caption, a caption is not a
            string, or the tag / label matrices have the wrong shape or names.
    """

    def __init__(
        self,
        *,
        loaders: Sequence[ImageLoader],
        captions: Sequence[Sequence[str]],
        tags: np.ndarray | None,
        labels: np.ndarray | None,
        label_names: Sequence[str],
        tag_names: Sequence[str],
        sources: Sequence[str],
        transform: ImageTransform | None = None,
    ) -> None:
        num_items = len(loaders)
        if not len(captions) == num_items == len(sources):
            raise DatasetError(
                f"loaders, captions and sources must have the same length, got "
                f"{num_items}, {len(captions)} and {len(sources)}"
            )
        caption_tuples: list[tuple[str, ...]] = []
        for index, texts in enumerate(captions):
            if isinstance(texts, str):
                raise DatasetError(f"captions[{index}] ({sources[index]}) is a string; give each image a list of texts")
            texts_tuple = tuple(texts)
            if not texts_tuple:
                raise DatasetError(f"image {index} ({sources[index]}) has no caption: give it at least one text")
            if not all(isinstance(text, str) for text in texts_tuple):
                raise DatasetError(f"captions of image {index} ({sources[index]}) must be strings, got {texts_tuple!r}")
            caption_tuples.append(texts_tuple)
        self._tags = _optional_matrix(tags, name="tags", num_items=num_items)
        self._labels = _optional_matrix(labels, name="labels", num_items=num_items)
        for matrix, names, what in ((self._tags, tag_names, "tag_names"), (self._labels, label_names, "label_names")):
            expected = 0 if matrix is None else matrix.shape[1]
            if len(names) != expected:
                raise DatasetError(f"{what} has {len(names)} names for {expected} columns")
        self._loaders = list(loaders)
        self._captions = tuple(caption_tuples)
        self._label_names = list(label_names)
        self._tag_names = list(tag_names)
        self._sources = list(sources)
        self.transform = transform

    def __len__(self) -> int:
        return len(self._loaders)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Returns `(image [3, H, W], index)`.

        Raises:
            IndexError: `index` is outside `[0, len(self))`.
            DatasetError: The dataset has no transform.
            CorruptImageError: The image cannot be read.
        """
        if self.transform is None:
            raise DatasetError(
                "this dataset has no transform, so it cannot produce tensors: "
                "call with_transform(eval_transform(image_size=...)) first"
            )
        position = self._check_index(index)
        return self.transform(self._loaders[position]()), position

    def _check_index(self, index: int) -> int:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for a dataset of {len(self)} images")
        return index % len(self)

    def load_image(self, index: int) -> Image.Image:
        """The raw, untransformed image of item `index`.

        Raises:
            CorruptImageError: The image cannot be read; the message names its file.
        """
        return self._loaders[self._check_index(index)]()

    def source(self, index: int) -> str:
        """Where item `index` comes from: a file path, or e.g. "digit_pairs:3:12-40"."""
        return self._sources[self._check_index(index)]

    def captions_of(self, index: int) -> list[str]:
        """The texts of item `index` (a copy)."""
        return list(self._captions[self._check_index(index)])

    @property
    def captions(self) -> CaptionView:
        """The texts of every image `[N][1..5]`: `captions[i]` is a fresh list, nothing is copied in bulk."""
        return CaptionView(self._captions)

    @property
    def tags(self) -> np.ndarray | None:
        """Tag / bag-of-words vectors `[N, V]`, float32, read-only; None for caption datasets."""
        return self._tags

    @property
    def labels(self) -> np.ndarray | None:
        """Multi-hot labels `[N, C]`, float32, read-only; None where the dataset has no categories."""
        return self._labels

    @property
    def label_names(self) -> list[str]:
        """Name of each label column `[C]` (a copy)."""
        return list(self._label_names)

    @property
    def tag_names(self) -> list[str]:
        """Name of each tag column `[V]` (a copy)."""
        return list(self._tag_names)

    @property
    def tag_dim(self) -> int | None:
        """V, the length of a tag vector; None when the dataset has no tags."""
        return None if self._tags is None else int(self._tags.shape[1])

    @property
    def num_labels(self) -> int | None:
        """C, the number of label columns; None when the dataset has no labels."""
        return None if self._labels is None else int(self._labels.shape[1])

    def texts(self) -> tuple[list[str], np.ndarray]:
        """Every caption, flattened, and the index of the image it describes.

        Returns:
            `(texts [T], owners [T])`: image 0's captions first, then image 1's, ...;
            `owners` is int64 with `owners[t]` the image of `texts[t]`.
        """
        texts = [text for image_texts in self._captions for text in image_texts]
        owners = np.repeat(np.arange(len(self), dtype=np.int64), [len(image_texts) for image_texts in self._captions])
        return texts, owners

    def subset(self, indices: Sequence[int] | np.ndarray) -> CrossModalDataset:
        """A dataset of the items at `indices`, in that order, with the same transform.

        Args:
            indices: Item indices `[M]` into this dataset (repeats allowed).

        Raises:
            IndexError: An index is out of range.
        """
        positions = [self._check_index(int(index)) for index in np.asarray(indices, dtype=np.int64).reshape(-1)]
        return CrossModalDataset(
            loaders=[self._loaders[position] for position in positions],
            captions=[self._captions[position] for position in positions],
            tags=None if self._tags is None else self._tags[positions],
            labels=None if self._labels is None else self._labels[positions],
            label_names=self._label_names,
            tag_names=self._tag_names,
            sources=[self._sources[position] for position in positions],
            transform=self.transform,
        )

    def with_transform(self, transform: ImageTransform | None) -> CrossModalDataset:
        """The same items with another transform; this dataset is left unchanged."""
        return CrossModalDataset(
            loaders=self._loaders,
            captions=self._captions,
            tags=self._tags,
            labels=self._labels,
            label_names=self._label_names,
            tag_names=self._tag_names,
            sources=self._sources,
            transform=transform,
        )

    def __repr__(self) -> str:
        texts = sum(len(image_texts) for image_texts in self._captions)
        return f"CrossModalDataset(images={len(self)}, texts={texts}, tag_dim={self.tag_dim}, labels={self.num_labels})"


@dataclass(frozen=True)
class CrossModalSplitIndices:
    """Item indices `[M]` (int64) of the three parts of a cross-modal dataset."""

    train: np.ndarray
    query: np.ndarray
    retrieval: np.ndarray


@dataclass(frozen=True)
class LoadedCrossModal:
    """A loaded dataset, and the split its packaging carries (None: split it with the seed)."""

    dataset: CrossModalDataset
    packaged_split: CrossModalSplitIndices | None = None


@dataclass(frozen=True)
class CrossModalSplits:
    """A job's three image-text datasets.

    `train` has the training transform (augmented per `DatasetSpec.augment`); `query` and
    `retrieval` have the eval transform. For caption datasets `query` and `retrieval` hold
    the same test images (each modality queries the other).
    """

    train: CrossModalDataset
    query: CrossModalDataset
    retrieval: CrossModalDataset


def random_query_split(*, num_items: int, query_size: int, train_size: int, seed: int) -> CrossModalSplitIndices:
    """The DCMH split: `query_size` random queries, the rest retrieval, `train_size` of it trains.

    The items are permuted with `seed`; the first `query_size` are the queries, the others
    the retrieval set, and `train_size` retrieval items are drawn without replacement (same
    generator). Each part is returned in ascending order.

    Args:
        num_items: N, the dataset size.
        query_size: Number of queries, at most `N - 1` (the retrieval set needs an item).
        train_size: Number of training items, at most `N - query_size`.
        seed: Seed of the permutation and the draw.

    Returns:
        The indices of the train `[train_size]`, query `[query_size]` and retrieval
        `[N - query_size]` parts.

    Raises:
        DatasetError: The sizes do not fit in `num_items`; the message names all three.

    >>> parts = random_query_split(num_items=10, query_size=2, train_size=5, seed=0)
    >>> len(parts.query), len(parts.retrieval), len(parts.train)
    (2, 8, 5)
    """
    if query_size < 1 or train_size < 1:
        raise DatasetError(f"query_size and train_size must be >= 1, got {query_size} and {train_size}")
    if query_size + 1 > num_items:
        raise DatasetError(
            f"query_size={query_size} leaves no retrieval item in a dataset of {num_items} items: "
            f"set cross_modal.query_size to at most {num_items - 1}"
        )
    retrieval_size = num_items - query_size
    if train_size > retrieval_size:
        raise DatasetError(
            f"train_size={train_size} exceeds the retrieval set of {retrieval_size} items "
            f"({num_items} items - query_size={query_size}): set cross_modal.train_size to at most {retrieval_size}"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(num_items)
    query = np.sort(order[:query_size]).astype(np.int64)
    retrieval = np.sort(order[query_size:]).astype(np.int64)
    train = np.sort(rng.choice(retrieval, size=train_size, replace=False)).astype(np.int64)
    return CrossModalSplitIndices(train=train, query=query, retrieval=retrieval)


def _load(spec: DatasetSpec) -> tuple[LoadedCrossModal, CrossModalSplitIndices]:
    split = spec.cross_modal
    loaded = load_image_text_dataset(spec.name, root=spec.root, split=split)
    if loaded.packaged_split is not None:
        return loaded, loaded.packaged_split
    indices = random_query_split(
        num_items=len(loaded.dataset), query_size=split.query_size, train_size=split.train_size, seed=split.seed
    )
    return loaded, indices


def cross_modal_datasets_from_spec(spec: DatasetSpec) -> CrossModalSplits:
    """Loads the image-text dataset of a job and splits it into train, query and retrieval.

    Args:
        spec: A validated dataset spec naming a dataset of kind `image_text`; its
            `cross_modal` part sets the split, `image_size` / `mean` / `std` / `augment`
            the transforms (as `datasets_from_spec` does for image datasets).

    Returns:
        The train part with `train_transform(augment=spec.augment)`, the query and
        retrieval parts with `eval_transform`.

    Raises:
        DatasetError: The dataset cannot be read, or the split sizes do not fit it.
    """
    loaded, indices = _load(spec)
    dataset = loaded.dataset
    training = train_transform(image_size=spec.image_size, mean=spec.mean, std=spec.std, augment=spec.augment)
    evaluation = eval_transform(image_size=spec.image_size, mean=spec.mean, std=spec.std)
    logger.info(
        "cross-modal dataset %s: %d images, %d train, %d queries, %d retrieval (%s split)",
        spec.name,
        len(dataset),
        len(indices.train),
        len(indices.query),
        len(indices.retrieval),
        "packaged" if loaded.packaged_split is not None else f"seed {spec.cross_modal.seed}",
    )
    return CrossModalSplits(
        train=dataset.subset(indices.train).with_transform(training),
        query=dataset.subset(indices.query).with_transform(evaluation),
        retrieval=dataset.subset(indices.retrieval).with_transform(evaluation),
    )

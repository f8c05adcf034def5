"""The dataset type every loader returns: raw PIL images, integer labels, one transform.

An `ImageDataset` holds one loader per image (a small picklable callable), so a
subset or a re-transformed copy shares the loaders instead of reading anything, and
the dataset pickles cheaply into DataLoader workers and Ray workers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from retrieval.data.transforms import ImageTransform
from retrieval.errors import CorruptImageError, DatasetError

ImageLoader = Callable[[], Image.Image]

# Pillow signals an unreadable file through several exception types: OSError (truncated
# data, UnidentifiedImageError), SyntaxError and ValueError (malformed headers of some
# formats) and DecompressionBombError (absurd declared size).
_UNREADABLE_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def read_image(path: str | Path) -> Image.Image:
    """Reads and fully decodes an image file of a dataset as RGB.

    The one decoder of dataset files. Uploads to the search service go through
    `retrieval.serving.images.decode_image` instead, which accepts fewer formats and caps the
    pixel count before decoding (an upload is untrusted; a dataset is the operator's own).

    Args:
        path: Image file.

    Returns:
        The decoded RGB image.

    Raises:
        CorruptImageError: The file is missing or not a readable image; the message names
            the path and the underlying reason.
    """
    try:
        with Image.open(Path(path)) as image:
            # Image.open only parses the header; load() decodes the pixels now so a corrupt
            # body fails here, with the file's name, and not later inside a transform.
            image.load()
            return image.convert("RGB")
    except _UNREADABLE_IMAGE_ERRORS as error:
        raise CorruptImageError(f"cannot read image {path}: {type(error).__name__}: {error}") from error


@dataclass(frozen=True)
class ImageFileLoader:
    """Loads one image file lazily, as RGB. Picklable, so it travels to data workers."""

    path: Path

    def __call__(self) -> Image.Image:
        return read_image(self.path)


@dataclass(frozen=True, eq=False)
class ArrayImageLoader:
    """Builds a PIL image from an in-memory uint8 array `[H, W]` (grayscale) or `[H, W, 3]`."""

    pixels: np.ndarray

    def __call__(self) -> Image.Image:
        return Image.fromarray(self.pixels)


class ImageDataset(torch.utils.data.Dataset[tuple[torch.Tensor, int, int]]):
    """A labelled image dataset whose items all go through one transform.

    Item `i` is `(transform(load_image(i)), label, i)`: a float tensor `[3, H, W]`, the
    class id (an index into `class_names`) and the item's index in this dataset, so an
    embedding computed in a DataLoader can be matched back to `source(i)`.

    Args:
        loaders: One zero-argument callable per image, returning the raw PIL image.
        labels: Class ids `[N]`, each in `[0, len(class_names))`.
        class_names: Name of each class id.
        sources: Where each image comes from (a file path, or e.g. "digits:123") `[N]`.
        transform: Maps a PIL image to a tensor `[3, H, W]`; None means the dataset only
            serves raw images (`load_image`) until `with_transform` gives it one.

    Raises:
        DatasetError: The lengths of loaders, labels and sources differ, or a label is
            outside `[0, len(class_names))`.
    """

    def __init__(
        self,
        *,
        loaders: Sequence[ImageLoader],
        labels: np.ndarray,
        class_names: Sequence[str],
        sources: Sequence[str],
        transform: ImageTransform | None,
    ) -> None:
        label_array = np.asarray(labels)
        if label_array.ndim != 1:
            raise DatasetError(f"labels must be one-dimensional [N], got shape {label_array.shape}")
        if label_array.size and not np.issubdtype(label_array.dtype, np.integer):
            raise DatasetError(f"labels must be integer class ids, got dtype {label_array.dtype}")
        if not len(loaders) == len(label_array) == len(sources):
            raise DatasetError(
                f"loaders, labels and sources must have the same length, got "
                f"{len(loaders)}, {len(label_array)} and {len(sources)}"
            )
        if label_array.size and (label_array.min() < 0 or label_array.max() >= len(class_names)):
            raise DatasetError(
                f"labels must lie in [0, {len(class_names)}) for {len(class_names)} class names, "
                f"got range [{label_array.min()}, {label_array.max()}]"
            )
        self._loaders = list(loaders)
        self._labels = label_array.astype(np.int64)
        self._labels.flags.writeable = False
        self._class_names = list(class_names)
        self._sources = list(sources)
        self.transform = transform

    @classmethod
    def from_files(
        cls,
        *,
        paths: Sequence[Path],
        labels: Sequence[int] | np.ndarray,
        class_names: Sequence[str],
        transform: ImageTransform | None,
    ) -> ImageDataset:
        """A dataset of image files read lazily, each file's path as its source."""
        return cls(
            loaders=[ImageFileLoader(path=path) for path in paths],
            labels=np.asarray(labels, dtype=np.int64),
            class_names=class_names,
            sources=[str(path) for path in paths],
            transform=transform,
        )

    def __len__(self) -> int:
        return len(self._loaders)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        """Returns `(image [3, H, W], label, index)`.

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
        image = self.load_image(index)
        return self.transform(image), int(self._labels[index]), int(index)

    @property
    def labels(self) -> np.ndarray:
        """Class ids `[N]`, int64, read-only."""
        return self._labels

    @property
    def class_names(self) -> list[str]:
        """Name of each class id (a copy)."""
        return list(self._class_names)

    @property
    def num_classes(self) -> int:
        """Number of class names (some may have no item in a subset)."""
        return len(self._class_names)

    def _check_index(self, index: int) -> int:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for a dataset of {len(self)} images")
        return index % len(self)

    def source(self, index: int) -> str:
        """Where item `index` comes from: a file path, or e.g. "digits:123"."""
        return self._sources[self._check_index(index)]

    def load_image(self, index: int) -> Image.Image:
        """The raw, untransformed image of item `index`.

        Raises:
            CorruptImageError: The image cannot be read; the message names its source.
        """
        return self._loaders[self._check_index(index)]()

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageDataset:
        """A dataset of the items at `indices`, in that order, with the same transform.

        Labels keep this dataset's class ids and `class_names` are kept whole.

        Args:
            indices: Item indices `[M]` into this dataset.

        Raises:
            IndexError: An index is out of range.
        """
        positions = [self._check_index(int(index)) for index in np.asarray(indices, dtype=np.int64)]
        return ImageDataset(
            loaders=[self._loaders[position] for position in positions],
            labels=self._labels[positions] if positions else np.zeros(0, dtype=np.int64),
            class_names=self._class_names,
            sources=[self._sources[position] for position in positions],
            transform=self.transform,
        )

    def with_transform(self, transform: ImageTransform | None) -> ImageDataset:
        """The same items with another transform; this dataset is left unchanged."""
        return ImageDataset(
            loaders=self._loaders,
            labels=self._labels,
            class_names=self._class_names,
            sources=self._sources,
            transform=transform,
        )

    def __repr__(self) -> str:
        return f"ImageDataset(images={len(self)}, classes={self.num_classes})"


def concatenate_datasets(datasets: Sequence[ImageDataset]) -> ImageDataset:
    """One dataset of the items of several, in order (the first one's class names and transform).

    Raises:
        DatasetError: no dataset is given.
    """
    if not datasets:
        raise DatasetError("cannot concatenate an empty list of datasets")
    loaders: list[ImageLoader] = []
    sources: list[str] = []
    for dataset in datasets:
        loaders.extend(functools.partial(dataset.load_image, position) for position in range(len(dataset)))
        sources.extend(dataset.source(position) for position in range(len(dataset)))
    return ImageDataset(
        loaders=loaders,
        labels=np.concatenate([dataset.labels for dataset in datasets]),
        class_names=datasets[0].class_names,
        sources=sources,
        transform=datasets[0].transform,
    )

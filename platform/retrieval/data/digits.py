"""scikit-learn's bundled handwritten digits: 1,797 real 8x8 images of 10 classes.

Bundled with scikit-learn, so it needs no download: the default dataset of every job,
test and demo. Pixels are turned into 8-bit grayscale images; the shared transform
upsamples them to the model's input size.
"""

from __future__ import annotations

import logging

import numpy as np
from sklearn.datasets import load_digits

from retrieval.data.base import ArrayImageLoader, ImageDataset
from retrieval.data.transforms import ImageTransform

logger = logging.getLogger(__name__)

# load_digits() stores each pixel as a count of set bits in a 4x4 block: 0..16.
_DIGITS_MAX_VALUE = 16.0


def load_digits_dataset(*, transform: ImageTransform | None = None) -> ImageDataset:
    """Loads the 1,797 digits as 8x8 grayscale PIL images, class names "0".."9".

    Pixel values 0..16 map to `round(value * 255 / 16)`; the source of item `i` is
    "digits:<i>", `i` being the row in `sklearn.datasets.load_digits()`.

    Args:
        transform: Maps a PIL image to a tensor `[3, H, W]`, e.g.
            `eval_transform(image_size=32)`; None serves raw images only.

    Returns:
        The dataset, in scikit-learn's order (deterministic).
    """
    bunch = load_digits()
    pixels = np.rint(bunch.images * (255.0 / _DIGITS_MAX_VALUE)).astype(np.uint8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    logger.debug("loaded %d digits images", len(labels))
    return ImageDataset(
        loaders=[ArrayImageLoader(pixels=image_pixels) for image_pixels in pixels],
        labels=labels,
        class_names=[str(digit) for digit in range(10)],
        sources=[f"digits:{index}" for index in range(len(labels))],
        transform=transform,
    )

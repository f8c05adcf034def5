"""The bundled digits dataset: size, classes, pixels and the shared transform."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits

from retrieval.data import eval_transform, load_digits_dataset


def test_digits_has_1797_images_of_ten_classes() -> None:
    dataset = load_digits_dataset()
    assert len(dataset) == 1797
    assert dataset.class_names == [str(digit) for digit in range(10)]
    np.testing.assert_array_equal(dataset.labels, load_digits().target)
    assert dataset.source(123) == "digits:123"


def test_digit_pixels_are_the_sklearn_values_scaled_to_8_bit() -> None:
    dataset = load_digits_dataset()
    sklearn_images = load_digits().images
    for index in (0, 500, 1796):
        image = dataset.load_image(index)
        assert (image.mode, image.size) == ("L", (8, 8))
        expected = np.floor(sklearn_images[index] * 255 / 16 + 0.5).astype(np.uint8)
        np.testing.assert_array_equal(np.asarray(image), expected)
    all_pixels = np.stack([np.asarray(dataset.load_image(index)) for index in range(len(dataset))])
    assert (all_pixels.min(), all_pixels.max()) == (0, 255)


def test_digits_through_the_transform_give_3x32x32_deterministically() -> None:
    dataset = load_digits_dataset(transform=eval_transform(image_size=32))
    image, label, index = dataset[42]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert (label, index) == (int(load_digits().target[42]), 42)
    torch.testing.assert_close(load_digits_dataset(transform=eval_transform(image_size=32))[42][0], image)

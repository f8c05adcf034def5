"""The shared preprocessing: shapes, exact values against a PIL + numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from retrieval.data import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform


def _reference_eval(image: Image.Image, *, image_size: int) -> np.ndarray:
    """The eval preprocessing written out with Pillow and numpy: [3, H, W] float32."""
    resized = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
    scaled = np.asarray(resized, dtype=np.float32) / 255.0
    normalized = (scaled - np.asarray(IMAGENET_MEAN, dtype=np.float32)) / np.asarray(IMAGENET_STD, dtype=np.float32)
    return normalized.transpose(2, 0, 1)


def _random_image(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"L": None, "RGB": 3, "RGBA": 4}[mode]
    shape = (size[1], size[0]) if channels is None else (size[1], size[0], channels)
    return Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8))


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_eval_transform_matches_pil_numpy_reference(mode: str) -> None:
    image = _random_image(mode, (13, 9), seed=3)
    tensor = eval_transform(image_size=24)(image)
    assert tensor.shape == (3, 24, 24)
    assert tensor.dtype == torch.float32
    np.testing.assert_allclose(tensor.numpy(), _reference_eval(image, image_size=24), atol=1e-5)


def test_eval_transform_of_a_constant_image_is_the_normalized_constant() -> None:
    tensor = eval_transform(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))(Image.new("L", (8, 8), 255))
    expected = torch.tensor([2.0, 1.0, 0.5]).view(3, 1, 1).expand(3, 32, 32)
    torch.testing.assert_close(tensor, expected)


def test_train_transform_without_augmentation_equals_eval_transform() -> None:
    image = _random_image("RGB", (20, 20), seed=5)
    torch.testing.assert_close(
        train_transform(image_size=16, augment=False)(image), eval_transform(image_size=16)(image)
    )


def test_train_transform_augments_randomly_and_reproducibly_under_a_seed() -> None:
    image = _random_image("L", (8, 8), seed=7)
    transform = train_transform(image_size=32)
    torch.manual_seed(0)
    first = transform(image)
    second = transform(image)
    torch.manual_seed(0)
    first_again = transform(image)
    assert first.shape == (3, 32, 32)
    assert not torch.equal(first, second)
    torch.testing.assert_close(first, first_again)


def test_horizontal_flip_only_when_asked() -> None:
    def has_flip(transform: v2.Compose) -> bool:
        return any(isinstance(step, v2.RandomHorizontalFlip) for step in transform.transforms)

    assert not has_flip(train_transform(image_size=16))
    assert has_flip(train_transform(image_size=16, hflip=True))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": 0}, "image_size must be >= 1, got 0"),
        ({"image_size": 8, "mean": (0.5, 0.5)}, "need 3 values"),
        ({"image_size": 8, "std": (1.0, 0.0, 1.0)}, "std values must be > 0"),
    ],
)
def test_bad_settings_are_named(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        eval_transform(**kwargs)  # type: ignore[arg-type]

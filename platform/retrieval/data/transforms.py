"""The image preprocessing shared by training, evaluation and the search service.

Every dataset yields raw PIL images; these transforms turn them into normalised
`[3, H, W]` float32 tensors. The search service preprocesses an uploaded image with
`eval_transform`, so a query is embedded exactly like a test image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torchvision.transforms import v2

from retrieval.config import IMAGENET_MEAN, IMAGENET_STD

ImageTransform = Callable[[Image.Image], torch.Tensor]

# Digits and most retrieval objects are not mirror-symmetric ("2" vs its mirror),
# so augmentation stays mild: a small crop jitter and a small rotation.
_CROP_SCALE = (0.8, 1.0)
_ROTATION_DEGREES = 10.0


def _validate(*, image_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got mean={list(mean)} std={list(std)}")
    if any(value <= 0 for value in std):
        raise ValueError(f"std values must be > 0, got {list(std)}")


def _to_normalized_tensor(*, mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ]


def eval_transform(
    *,
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> ImageTransform:
    """Deterministic preprocessing for evaluation, indexing and search queries.

    Converts to RGB, resizes to `(image_size, image_size)` (bilinear, antialiased),
    scales to [0, 1] and normalises per channel.

    Args:
        image_size: Side of the square output, in pixels.
        mean: Per-channel mean subtracted after scaling to [0, 1].
        std: Per-channel standard deviation divided by after subtracting the mean.

    Returns:
        A callable mapping a PIL image to a float32 tensor `[3, image_size, image_size]`.

    >>> tensor = eval_transform(image_size=16)(Image.new("L", (8, 8), color=255))
    >>> tuple(tensor.shape), tensor.dtype
    ((3, 16, 16), torch.float32)
    """
    _validate(image_size=image_size, mean=mean, std=std)
    transform: ImageTransform = v2.Compose(
        [
            v2.RGB(),
            v2.Resize((image_size, image_size), interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
            *_to_normalized_tensor(mean=mean, std=std),
        ]
    )
    return transform


def landmark_transform(
    *,
    max_side: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> ImageTransform:
    """Evaluation preprocessing that keeps the aspect ratio (landmark retrieval protocol).

    The longer side becomes `max_side` pixels (as the revisited Oxford/Paris protocol
    evaluates at 1024), so images of one batch differ in size: embed them one at a time.

    >>> tuple(landmark_transform(max_side=16)(Image.new("RGB", (32, 8))).shape)
    (3, 4, 16)
    """
    _validate(image_size=max_side, mean=mean, std=std)
    transform: ImageTransform = v2.Compose(
        [
            v2.RGB(),
            v2.Resize(size=None, max_size=max_side, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
            *_to_normalized_tensor(mean=mean, std=std),
        ]
    )
    return transform


def train_transform(
    *,
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    augment: bool = True,
    hflip: bool = False,
) -> ImageTransform:
    """Preprocessing for training: `eval_transform` plus light random augmentation.

    With `augment`, the resize becomes a `RandomResizedCrop` over 80-100 % of the
    image, followed by a rotation of up to 10 degrees and, only if `hflip`, a
    horizontal flip (off by default: digits are not flip-invariant).

    Args:
        image_size: Side of the square output, in pixels.
        mean: Per-channel mean subtracted after scaling to [0, 1].
        std: Per-channel standard deviation.
        augment: When False, identical to `eval_transform`.
        hflip: Add a random horizontal flip (p=0.5); ignored when `augment` is False.

    Returns:
        A callable mapping a PIL image to a float32 tensor `[3, image_size, image_size]`.
    """
    if not augment:
        return eval_transform(image_size=image_size, mean=mean, std=std)
    _validate(image_size=image_size, mean=mean, std=std)
    augmentations: list[v2.Transform] = [
        v2.RGB(),
        v2.RandomResizedCrop(
            (image_size, image_size),
            scale=_CROP_SCALE,
            interpolation=v2.InterpolationMode.BILINEAR,
            antialias=True,
        ),
        v2.RandomRotation(degrees=_ROTATION_DEGREES, interpolation=v2.InterpolationMode.BILINEAR),
    ]
    if hflip:
        augmentations.append(v2.RandomHorizontalFlip(p=0.5))
    transform: ImageTransform = v2.Compose([*augmentations, *_to_normalized_tensor(mean=mean, std=std)])
    return transform

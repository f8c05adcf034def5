"""Multi-scale extraction: embed a batch at several image sizes and average (thesis ch. 2).

The descriptor of "Fine-tuning CNN Image Retrieval with No Human Annotation" (Radenovic et al.,
TPAMI 2019, sec. 5.2) and of most off-the-shelf baselines since: scales 1, 1/sqrt(2) and 1/2.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

DEFAULT_SCALES = (1.0, 1.0 / math.sqrt(2.0), 0.5)


def resize_batch(images: torch.Tensor, *, scale: float) -> torch.Tensor:
    """Resize `[B, 3, H, W]` to `[B, 3, round(H s), round(W s)]` (bilinear, antialiased; at least 1 px).

    A scale of 1 returns the batch itself.
    """
    if scale <= 0:
        raise ValueError(f"scales must be > 0, got {scale}")
    if scale == 1.0:
        return images
    height, width = images.shape[-2:]
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


def multiscale_embed(
    embed: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    *,
    scales: Sequence[float] = DEFAULT_SCALES,
) -> torch.Tensor:
    """The L2-normalised mean of the embeddings of `images` resized to each scale.

    Args:
        embed: maps images `[B, 3, h, w]` of any size to embeddings `[B, D]`.
        images: `[B, 3, H, W]`.
        scales: resize factors; 1.0 embeds the images as they are.

    Returns:
        `[B, D]`, unit norm.

    Raises:
        ValueError: no scales, or a scale that is not positive.
    """
    if len(scales) == 0:
        raise ValueError("scales must name at least one scale, e.g. (1.0, 0.7071, 0.5)")
    if any(scale <= 0 for scale in scales):
        raise ValueError(f"scales must be > 0, got {list(scales)}")
    total = torch.stack([embed(resize_batch(images, scale=scale)) for scale in scales]).mean(dim=0)
    return F.normalize(total, dim=-1)

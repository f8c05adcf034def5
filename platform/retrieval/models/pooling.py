"""Global pooling of a convolutional feature map into one vector per image (thesis ch. 2)."""

from __future__ import annotations

import torch
from torch import nn


class GeM(nn.Module):
    """Generalised-mean pooling, `(mean_hw x^p)^(1/p)`, with a learnable `p`.

    p = 1 is average pooling (SPoC), p -> inf tends to max pooling (MAC).
    Radenovic et al., "Fine-tuning CNN Image Retrieval with No Human Annotation", TPAMI 2019, eq. 2.

    Args:
        p: initial exponent (3 in the paper).
        learnable: whether `p` is trained.
        eps: floor applied before the power, so that p-th roots of zeros stay finite.
    """

    def __init__(self, *, p: float = 3.0, learnable: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)), requires_grad=learnable)
        self.eps = eps

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Pool `[B, C, H, W]` into `[B, C]`."""
        clamped = features.clamp(min=self.eps)
        return clamped.pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.3f}, eps={self.eps}"


def build_pooling(*, name: str, gem_p: float = 3.0) -> nn.Module:
    """A pooling layer by name: `gem`, `avg` (SPoC) or `max` (MAC); `[B, C, H, W] -> [B, C]`."""
    if name == "gem":
        return GeM(p=gem_p)
    if name == "avg":
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    if name == "max":
        return nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(1))
    raise ValueError(f"unknown pooling {name!r}; expected one of gem, avg, max")

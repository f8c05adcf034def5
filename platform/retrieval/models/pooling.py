"""Global pooling of a convolutional feature map into one vector per image (thesis ch. 2).

Every layer here maps `[B, C, H, W]` to `[B, C]`: MAC, SPoC, GeM, R-MAC and CroW, the
off-the-shelf aggregations compared in "Deep Image Retrieval: A Survey" (arXiv 2101.11282).
"""

from __future__ import annotations

import math

import torch
from torch import nn

POOLING_NAMES = ("mac", "spoc", "gem", "rmac", "crow")
POOLING_ALIASES = {"max": "mac", "avg": "spoc"}


class MAC(nn.Module):
    """Maximum activations of convolutions: the global max of every channel.

    Tolias et al., "Particular object retrieval with integral max-pooling of CNN activations", ICLR 2016.
    """

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Pool `[B, C, H, W]` into `[B, C]`."""
        return features.amax(dim=(-2, -1))


class SPoC(nn.Module):
    """Sum-pooled convolutional features, as a (weighted) average over positions.

    Babenko & Lempitsky, "Aggregating Deep Convolutional Features for Image Retrieval", ICCV 2015.
    With `center_prior`, position `(y, x)` (cell centres, `y + 0.5`) weighs
    `exp(-((y - H/2)^2 + (x - W/2)^2) / (2 sigma^2))` with `sigma` one third of the distance from
    the centre to the closest border (`min(H, W) / 6`). The weights are normalised to sum to 1, so
    without the prior this is average pooling; the paper's plain sum differs only by a constant
    factor, which the final L2 normalisation removes.

    Args:
        center_prior: weigh positions by the Gaussian centre prior.
    """

    def __init__(self, *, center_prior: bool = False) -> None:
        super().__init__()
        self.center_prior = center_prior

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Pool `[B, C, H, W]` into `[B, C]`."""
        if not self.center_prior:
            return features.mean(dim=(-2, -1))
        weights = spoc_center_prior(
            height=features.shape[-2], width=features.shape[-1], dtype=features.dtype, device=features.device
        )
        return (features * weights).sum(dim=(-2, -1))

    def extra_repr(self) -> str:
        return f"center_prior={self.center_prior}"


def spoc_center_prior(
    *, height: int, width: int, dtype: torch.dtype = torch.float32, device: torch.device | None = None
) -> torch.Tensor:
    """SPoC's Gaussian centre prior `[H, W]`, normalised to sum to 1 (see `SPoC`)."""
    sigma = min(height, width) / 6.0
    rows = torch.arange(height, dtype=dtype, device=device) + 0.5 - height / 2.0
    cols = torch.arange(width, dtype=dtype, device=device) + 0.5 - width / 2.0
    squared_distance = rows[:, None] ** 2 + cols[None, :] ** 2
    prior = torch.exp(-squared_distance / (2.0 * sigma**2))
    return prior / prior.sum()


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


def rmac_regions(*, height: int, width: int, levels: int = 3) -> list[tuple[int, int, int]]:
    """The square regions R-MAC pools over, on a multi-scale grid with about 40% overlap.

    Tolias et al., ICLR 2016, sec. 3, with the sampling of the `rmac` of cnnimageretrieval-pytorch
    (Radenovic et al.): level `l` (1..levels) has square regions of side `floor(2 min(H, W) / (l + 1))`,
    `l` of them along the short side and `l + extra` along the long side, where `extra` (1..6, 0 for a
    square map) is the count whose spacing makes consecutive regions overlap closest to 40%. Region
    starts are evenly spaced from 0 to `side_length - side` and rounded down. The whole map is not in
    the list (R-MAC adds it separately).

    The arithmetic is float32, as in that implementation, so that the regions (and R-MAC vectors)
    are identical to its output: in exact arithmetic a few shapes would get a different `extra` or
    a last region one cell further along.

    Args:
        height: feature-map height H.
        width: feature-map width W.
        levels: number of scales L.

    Returns:
        `(top, left, side)` per region, level by level, row-major within a level.

    >>> rmac_regions(height=3, width=3, levels=2)
    [(0, 0, 3), (0, 0, 2), (0, 1, 2), (1, 0, 2), (1, 1, 2)]
    """
    if height < 1 or width < 1:
        raise ValueError(f"feature map must be at least 1x1, got {height}x{width}")
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    short, long = min(height, width), max(height, width)
    extra = 0
    if height != width:
        # 2..7 regions along the long side: the count whose spacing gives the overlap closest to
        # 40%; the first one wins a tie.
        spacing = (long - short) / (torch.arange(2, 8, dtype=torch.float32) - 1)
        overlap_error = torch.abs((short**2 - short * spacing) / short**2 - 0.4)
        extra = int(torch.argmin(overlap_error).item()) + 1
    extra_width = extra if height < width else 0
    extra_height = extra if height > width else 0
    regions: list[tuple[int, int, int]] = []
    for level in range(1, levels + 1):
        side = math.floor(2 * short / (level + 1))
        if side == 0:
            continue
        tops = _evenly_spaced_starts(length=height, side=side, count=level + extra_height)
        lefts = _evenly_spaced_starts(length=width, side=side, count=level + extra_width)
        regions.extend((top, left, side) for top in tops for left in lefts)
    return regions


def _evenly_spaced_starts(*, length: int, side: int, count: int) -> list[int]:
    """`count` region starts `floor(c + k (length - side) / (count - 1)) - c`, k = 0..count-1, in float32.

    `c = floor(side / 2 - 1)` is the region's centre offset of the reference implementation; it
    cancels in exact arithmetic but not in float32, where it decides some roundings.
    """
    if count == 1:
        return [0]
    centre = math.floor(side / 2 - 1)
    spacing = (length - side) / (count - 1)
    starts = torch.floor(centre + torch.arange(count, dtype=torch.float32) * spacing) - centre
    return [int(start) for start in starts.tolist()]


class RMAC(nn.Module):
    """Regional MAC: the sum of the L2-normalised MAC vectors of the whole map and of its regions.

    Tolias et al., "Particular object retrieval with integral max-pooling of CNN activations",
    ICLR 2016, eq. 2 (without the per-region PCA-whitening, which `evaluation.enhancement` applies to
    whole vectors). Regions come from `rmac_regions`. The sum is not normalised here: the
    embedding network L2-normalises its output.

    Args:
        levels: number of region scales L (3 in the paper).
        eps: added to each region vector's norm before dividing.
    """

    def __init__(self, *, levels: int = 3, eps: float = 1e-6) -> None:
        super().__init__()
        if levels < 1:
            raise ValueError(f"R-MAC levels must be >= 1, got {levels}")
        self.levels = levels
        self.eps = eps

    def _normalised_max(self, region: torch.Tensor) -> torch.Tensor:
        vector = region.amax(dim=(-2, -1))
        return vector / (vector.norm(dim=-1, keepdim=True) + self.eps)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Pool `[B, C, H, W]` into `[B, C]`."""
        pooled = self._normalised_max(features)
        for top, left, side in rmac_regions(height=features.shape[-2], width=features.shape[-1], levels=self.levels):
            pooled = pooled + self._normalised_max(features[..., top : top + side, left : left + side])
        return pooled

    def extra_repr(self) -> str:
        return f"levels={self.levels}, eps={self.eps}"


class CroW(nn.Module):
    """Cross-dimensional weighting: spatially and channel-weighted sum pooling.

    Kalantidis et al., "Cross-dimensional Weighting for Aggregated Deep Convolutional Features",
    ECCV-W 2016, sec. 3. With `X` the (non-negative) map and `S = sum_k X_k`:
    spatial weights `alpha = (S / ||S||_a)^(1/b)`; channel weights
    `beta_k = log(sum_j Q_j / (Q_k + eps))` with `Q_k` the fraction of non-zero positions of
    channel k; output `f_k = beta_k * sum_hw alpha_hw X_khw`.

    CroW is defined on post-ReLU activations, so negative values are clamped to zero first.

    Args:
        a: norm of the spatial normalisation (2 in the paper).
        b: root applied to the normalised spatial map (2 in the paper).
        eps: keeps the channel weights finite for channels that are zero everywhere, and the
            spatial normalisation finite for an all-zero map.
    """

    def __init__(self, *, a: float = 2.0, b: float = 2.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.a = a
        self.b = b
        self.eps = eps

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Pool `[B, C, H, W]` into `[B, C]`."""
        activations = features.clamp(min=0.0)
        aggregated = activations.sum(dim=1)
        norm = aggregated.pow(self.a).sum(dim=(-2, -1), keepdim=True).pow(1.0 / self.a)
        spatial = (aggregated / norm.clamp(min=self.eps)).pow(1.0 / self.b)
        nonzero_fraction = (activations > 0).to(activations.dtype).mean(dim=(-2, -1))
        # An all-zero map gives log(eps / eps) = 0 rather than log(0).
        total = nonzero_fraction.sum(dim=1, keepdim=True).clamp(min=self.eps)
        channel = torch.log(total / (nonzero_fraction + self.eps))
        return channel * (activations * spatial.unsqueeze(1)).sum(dim=(-2, -1))

    def extra_repr(self) -> str:
        return f"a={self.a}, b={self.b}, eps={self.eps}"


def build_pooling(*, name: str, gem_p: float = 3.0, spoc_center_prior: bool = False, rmac_levels: int = 3) -> nn.Module:
    """A pooling layer by name, `[B, C, H, W] -> [B, C]`.

    Args:
        name: `mac`, `spoc`, `gem`, `rmac` or `crow`; `max` and `avg` are aliases of `mac` and `spoc`.
        gem_p: initial GeM exponent.
        spoc_center_prior: SPoC weighs positions by a Gaussian centre prior.
        rmac_levels: R-MAC region scales.

    Raises:
        ValueError: unknown name.
    """
    canonical = POOLING_ALIASES.get(name, name)
    if canonical == "mac":
        return MAC()
    if canonical == "spoc":
        return SPoC(center_prior=spoc_center_prior)
    if canonical == "gem":
        return GeM(p=gem_p)
    if canonical == "rmac":
        return RMAC(levels=rmac_levels)
    if canonical == "crow":
        return CroW()
    aliases = ", ".join(f"{alias}={target}" for alias, target in POOLING_ALIASES.items())
    raise ValueError(f"unknown pooling {name!r}; expected one of {', '.join(POOLING_NAMES)} (aliases: {aliases})")

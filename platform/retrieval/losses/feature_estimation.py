"""Feature estimation for incremental retrieval without keeping every old model (thesis ch. 6).

Our specification, completing what the paper's released code leaves unfinished: only the
penultimate model is kept. When task k finishes, the drift of the embeddings from model k-1 to
model k on task k's data is summarised per dimension by the low and high quantiles of the
relative change (`DriftStatistics`, a few KB stored with the checkpoint). At task t the
features of each older model j < t-1 are estimated from the penultimate model's features,
`f_hat_j = f_{t-1} + s * (u ⊙ f_{t-1})` with `u ~ U(low_j, high_j)` element-wise
(`estimate_features`), and correlations are distilled from each estimate with descending
importance (`descending_weights`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class DriftStatistics:
    """Per-dimension bounds of the relative change of the embeddings between two models.

    Attributes:
        low: `[D]` float32, the low quantile of `(f_new - f_old) / |f_old|` per dimension.
        high: `[D]` float32, the high quantile; `low <= high` element-wise, all finite.
    """

    low: np.ndarray
    high: np.ndarray

    def __post_init__(self) -> None:
        low = np.asarray(self.low, dtype=np.float32)
        high = np.asarray(self.high, dtype=np.float32)
        if low.ndim != 1 or high.ndim != 1 or low.shape != high.shape:
            raise ValueError(
                f"drift statistics need low and high of the same length [D], got shapes {list(low.shape)} "
                f"and {list(high.shape)}"
            )
        if not (np.isfinite(low).all() and np.isfinite(high).all()):
            raise ValueError("drift statistics must be finite; low or high holds NaN or infinity")
        above = np.flatnonzero(low > high)
        if above.size:
            first = int(above[0])
            raise ValueError(
                f"drift statistics need low <= high, but {above.size} dimensions break it, the first "
                f"being {first} (low {low[first]}, high {high[first]})"
            )
        # Frozen: the normalised arrays are set once, here.
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)

    @property
    def dimension(self) -> int:
        return int(self.low.shape[0])

    def to_dict(self) -> dict[str, list[float]]:
        """A JSON-ready form: `{"low": [...], "high": [...]}`."""
        return {"low": [float(value) for value in self.low], "high": [float(value) for value in self.high]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DriftStatistics:
        """Reads `to_dict`'s form back, checking it.

        Raises:
            ValueError: a missing or extra key, values that are not numbers, lengths that differ,
                a non-finite value, or a dimension with low > high.
        """
        keys = set(data)
        if keys != {"low", "high"}:
            raise ValueError(f"drift statistics need exactly the keys ['high', 'low'], got {sorted(keys)}")
        try:
            low = np.asarray(data["low"], dtype=np.float32)
            high = np.asarray(data["high"], dtype=np.float32)
        except (TypeError, ValueError) as error:
            raise ValueError(f"drift statistics low and high must be lists of numbers: {error}") from error
        return cls(low=low, high=high)


def drift_statistics(
    previous: np.ndarray,
    current: np.ndarray,
    *,
    low_quantile: float = 0.05,
    high_quantile: float = 0.95,
    eps: float = 1e-3,
) -> DriftStatistics:
    """How the embeddings moved from one model to the next, as per-dimension quantiles.

    The relative change of each element is `(current - previous) / max(|previous|, eps)`; `eps`
    keeps elements near 0 from dominating. Quantiles use NumPy's default (linear) interpolation.

    Args:
        previous: `[N, D]` model k-1's embeddings of task k's images.
        current: `[N, D]` model k's embeddings of the same images, same order.
        low_quantile: the lower quantile, in [0, 1].
        high_quantile: the upper quantile, in [low_quantile, 1].
        eps: floor of the denominator, > 0.

    Returns:
        The `[D]` low and high quantiles.

    Raises:
        ValueError: shapes that differ or are not `[N, D]` with N >= 1, non-finite embeddings,
            or bad quantiles / `eps`.

    >>> stats = drift_statistics(np.array([[1.0, 2.0], [2.0, -1.0]]), np.array([[1.5, 2.0], [1.0, -2.0]]),
    ...                          low_quantile=0.0, high_quantile=1.0)
    >>> stats.low.tolist(), stats.high.tolist()
    ([-0.5, -1.0], [0.5, 0.0])
    """
    before = np.asarray(previous, dtype=np.float64)
    after = np.asarray(current, dtype=np.float64)
    if before.ndim != 2 or before.shape != after.shape or len(before) == 0:
        raise ValueError(
            f"previous {list(before.shape)} and current {list(after.shape)} must be [N, D] embeddings of the "
            "same N >= 1 images"
        )
    if not (np.isfinite(before).all() and np.isfinite(after).all()):
        raise ValueError("previous and current embeddings must be finite; one holds NaN or infinity")
    if not 0.0 <= low_quantile <= high_quantile <= 1.0:
        raise ValueError(
            f"need 0 <= low_quantile <= high_quantile <= 1, got low_quantile={low_quantile}, "
            f"high_quantile={high_quantile}"
        )
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    relative = (after - before) / np.maximum(np.abs(before), eps)
    low, high = np.quantile(relative, [low_quantile, high_quantile], axis=0)
    return DriftStatistics(low=low.astype(np.float32), high=high.astype(np.float32))


def estimate_features(
    features: torch.Tensor,
    stats: DriftStatistics,
    *,
    scale: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """An older model's features estimated from the penultimate model's: `f + s * (u ⊙ f)`.

    `u ~ U(low, high)` is drawn element-wise, so each element of the estimate lies between
    `f + s*low*f` and `f + s*high*f` (in either order, by the sign of `f * s`). The estimate is a
    teacher, hence detached.

    Args:
        features: `[B, D]` the penultimate model's features of the batch.
        stats: the drift recorded between the older model and its successor, of dimension D.
        scale: `s`, how much of the recorded drift to apply (1 in the thesis).
        generator: the random source; drawn on its own device and moved to the features'.

    Returns:
        `[B, D]` estimates, same device and dtype as `features`, detached.

    Raises:
        ValueError: `features` is not `[B, D]` with the statistics' D.
    """
    if features.dim() != 2 or features.shape[1] != stats.dimension:
        raise ValueError(
            f"features must be [B, {stats.dimension}] to match the drift statistics, got {list(features.shape)}"
        )
    source = features.detach()
    device = generator.device if generator is not None else source.device
    uniform = torch.rand(source.shape, generator=generator, device=device, dtype=torch.float32)
    low = torch.from_numpy(stats.low).to(device)
    high = torch.from_numpy(stats.high).to(device)
    drift = (low + (high - low) * uniform).to(device=source.device, dtype=source.dtype)
    return source + scale * (drift * source)


def descending_weights(count: int, *, gamma: float = 0.5) -> list[float]:
    """Importance of the estimated older models, halving (for gamma = 0.5) with each step back.

    At task t the older models are j = 0 .. t-2 (0 the oldest), so `count = t - 1`, and
    `w_j = gamma^(t-1-j) = gamma^(count-j)`, normalised to sum 1: the newest estimate weighs
    most. The penultimate model itself is not counted here (it has weight 1 in the total).

    Args:
        count: number of estimated older models, >= 0.
        gamma: decay per step back, > 0.

    Returns:
        `count` weights, oldest first; `[]` for count 0.

    Raises:
        ValueError: `count` < 0 or `gamma` <= 0.

    >>> descending_weights(2)  # raw [0.25, 0.5]
    [0.3333333333333333, 0.6666666666666666]
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    raw = [gamma ** (count - index) for index in range(count)]
    total = sum(raw)
    return [weight / total for weight in raw]

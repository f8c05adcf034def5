"""Feature estimation for incremental retrieval without keeping every old model (thesis ch. 6).

Our specification (METHODS.md ch. 6, revised), completing what the paper's released code leaves
unfinished: only the penultimate model is kept. When task k finishes, a sample of task k's
training images is embedded with model k-1 (the teacher of task k) and with model k, and a
per-dimension least-squares **backward** affine map `f_{k-1} ≈ a_k ⊙ f_k + b_k` is fitted,
with its residual standard deviation `sigma_k` (`BackwardMap`, 3 x D floats, `fit_backward_map`).
At task t the penultimate model is model t-1; each older model's features are estimated by
chaining the backward maps from it,

    f_hat_{t-2} = a_{t-1} ⊙ f_{t-1} + b_{t-1} + s * sigma_{t-1} ⊙ eps
    f_hat_j     = a_{j+1} ⊙ f_hat_{j+1} + b_{j+1} + s * sigma_{j+1} ⊙ eps,   eps ~ N(0, I)

(`estimate_older_features`; s = 0 gives the mean estimate), so uncertainty grows along the
chain. Correlations are distilled from each estimate with descending importance
(`descending_weights`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

_KEYS = ("scale", "shift", "residual_std")


@dataclass(frozen=True)
class BackwardMap:
    """The per-dimension affine map from model k's features back to model k-1's: `a ⊙ f + b`, residual sigma.

    Attributes:
        scale: `[D]` float32, a_k.
        shift: `[D]` float32, b_k.
        residual_std: `[D]` float32, sigma_k >= 0, the standard deviation of the fit's residual.
    """

    scale: np.ndarray
    shift: np.ndarray
    residual_std: np.ndarray

    def __post_init__(self) -> None:
        arrays = {key: np.asarray(getattr(self, key), dtype=np.float32) for key in _KEYS}
        shapes = {key: list(array.shape) for key, array in arrays.items()}
        if any(array.ndim != 1 for array in arrays.values()) or len({tuple(s) for s in shapes.values()}) != 1:
            raise ValueError(f"a backward map needs scale, shift and residual_std of the same length [D], got {shapes}")
        for key, array in arrays.items():
            if not np.isfinite(array).all():
                raise ValueError(f"a backward map must be finite; {key} holds NaN or infinity")
        negative = np.flatnonzero(arrays["residual_std"] < 0)
        if negative.size:
            raise ValueError(f"residual_std must be >= 0, but dimension {int(negative[0])} is negative")
        # Frozen: the normalised arrays are set once, here.
        for key, array in arrays.items():
            object.__setattr__(self, key, array)

    @property
    def dimension(self) -> int:
        return int(self.scale.shape[0])

    def to_dict(self) -> dict[str, list[float]]:
        """A JSON-ready form: `{"scale": [...], "shift": [...], "residual_std": [...]}`."""
        return {key: [float(value) for value in getattr(self, key)] for key in _KEYS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BackwardMap:
        """Reads `to_dict`'s form back, checking it.

        Raises:
            ValueError: a missing or extra key, values that are not numbers, lengths that differ,
                a non-finite value or a negative residual_std.
        """
        keys = set(data)
        if keys != set(_KEYS):
            raise ValueError(f"a backward map needs exactly the keys {sorted(_KEYS)}, got {sorted(keys)}")
        try:
            arrays = {key: np.asarray(data[key], dtype=np.float32) for key in _KEYS}
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"a backward map's scale, shift and residual_std must be lists of numbers: {error}"
            ) from error
        return cls(**arrays)


def fit_backward_map(previous: np.ndarray, current: np.ndarray, *, eps: float = 1e-12) -> BackwardMap:
    """Per dimension, the least-squares fit `previous[:, d] ≈ a_d * current[:, d] + b_d` and its residual std.

    `a_d = cov(current_d, previous_d) / var(current_d)`, `b_d = mean(previous_d) - a_d mean(current_d)`;
    a dimension whose `current` is constant (variance <= eps) gets `a_d = 0`, `b_d = mean(previous_d)`.
    `sigma_d` is the root mean square of the residual `previous_d - a_d current_d - b_d`.

    Args:
        previous: `[N, D]` model k-1's embeddings of task k's images (the target of the map).
        current: `[N, D]` model k's embeddings of the same images, same order.
        eps: variance under which a dimension counts as constant, >= 0.

    Raises:
        ValueError: shapes that differ or are not `[N, D]` with N >= 2, or non-finite embeddings.

    >>> fitted = fit_backward_map(np.array([[1.0], [3.0], [5.0]]), np.array([[0.0], [1.0], [2.0]]))
    >>> fitted.scale.tolist(), fitted.shift.tolist(), fitted.residual_std.tolist()
    ([2.0], [1.0], [0.0])
    """
    target = np.asarray(previous, dtype=np.float64)
    source = np.asarray(current, dtype=np.float64)
    if target.ndim != 2 or target.shape != source.shape or len(target) < 2:
        raise ValueError(
            f"previous {list(target.shape)} and current {list(source.shape)} must be [N, D] embeddings of the "
            "same N >= 2 images"
        )
    if not (np.isfinite(target).all() and np.isfinite(source).all()):
        raise ValueError("previous and current embeddings must be finite; one holds NaN or infinity")
    source_mean, target_mean = source.mean(axis=0), target.mean(axis=0)
    centred_source, centred_target = source - source_mean, target - target_mean
    variance = (centred_source**2).mean(axis=0)
    covariance = (centred_source * centred_target).mean(axis=0)
    constant = variance <= eps
    scale = np.where(constant, 0.0, covariance / np.where(constant, 1.0, variance))
    shift = target_mean - scale * source_mean
    residual = target - (scale * source + shift)
    residual_std = np.sqrt((residual**2).mean(axis=0))
    return BackwardMap(
        scale=scale.astype(np.float32), shift=shift.astype(np.float32), residual_std=residual_std.astype(np.float32)
    )


def estimate_older_features(
    features: torch.Tensor,
    maps: Sequence[BackwardMap],
    *,
    noise_scale: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """The older models' features estimated from the penultimate model's by chaining backward maps.

    `maps[0]` maps the penultimate model's features one model back, `maps[1]` that estimate one
    further back, and so on: `f_hat = a ⊙ f + b + s * sigma ⊙ eps` at each step, each step from
    the previous (noisy) estimate. The estimates are teachers, hence detached.

    Args:
        features: `[B, D]` the penultimate model's features of the batch.
        maps: the backward maps, newest first (at task t: the maps of tasks t-1, t-2, ..., 1).
        noise_scale: `s`, the residual noise applied (1 in the thesis; 0 gives the mean estimate).
        generator: the random source of `eps`; drawn on its own device and moved to the features'.

    Returns:
        One `[B, D]` estimate per map, newest first (of models t-2, t-3, ..., 0), same device
        and dtype as `features`.

    Raises:
        ValueError: `features` is not `[B, D]` with every map's D, or `noise_scale` < 0.
    """
    if noise_scale < 0:
        raise ValueError(f"noise_scale must be >= 0, got {noise_scale}")
    for position, backward in enumerate(maps):
        if features.dim() != 2 or features.shape[1] != backward.dimension:
            raise ValueError(
                f"features must be [B, {backward.dimension}] to match backward map {position}, got "
                f"{list(features.shape)}"
            )
    estimate = features.detach()
    estimates = []
    for backward in maps:
        scale, shift, sigma = (
            torch.from_numpy(getattr(backward, key)).to(device=estimate.device, dtype=estimate.dtype) for key in _KEYS
        )
        estimate = scale * estimate + shift
        if noise_scale:
            device = generator.device if generator is not None else estimate.device
            noise = torch.randn(estimate.shape, generator=generator, device=device, dtype=torch.float32)
            estimate = estimate + noise_scale * sigma * noise.to(device=estimate.device, dtype=estimate.dtype)
        estimates.append(estimate)
    return estimates


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

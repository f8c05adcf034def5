"""Feature estimation (thesis ch. 6, revised specification): backward maps, chained estimates, weights.

The backward map is checked against a plain per-dimension least-squares fit (`np.polyfit`); the
chained estimate against features with a known exact per-dimension affine drift, which it must
recover exactly with s = 0; the descending weights against hand values.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from retrieval.losses.feature_estimation import (
    BackwardMap,
    descending_weights,
    estimate_older_features,
    fit_backward_map,
)


def test_the_backward_map_is_the_per_dimension_least_squares_fit_and_its_residual_std() -> None:
    generator = np.random.default_rng(0)
    current = generator.normal(size=(200, 4))
    previous = 0.7 * current + 0.1 + generator.normal(scale=0.05, size=current.shape)
    fitted = fit_backward_map(previous, current)
    for dim in range(4):
        slope, intercept = np.polyfit(current[:, dim], previous[:, dim], deg=1)
        residual = previous[:, dim] - (slope * current[:, dim] + intercept)
        assert fitted.scale[dim] == pytest.approx(slope, rel=1e-5)
        assert fitted.shift[dim] == pytest.approx(intercept, rel=1e-4, abs=1e-6)
        assert fitted.residual_std[dim] == pytest.approx(np.sqrt(np.mean(residual**2)), rel=1e-4)
    assert fitted.scale.dtype == np.float32 and fitted.scale.shape == (4,)


def test_a_constant_dimension_maps_to_the_older_mean() -> None:
    current = np.array([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]])
    previous = np.array([[2.0, 0.0], [4.0, 1.0], [6.0, 2.0]])
    fitted = fit_backward_map(previous, current)
    assert fitted.scale.tolist() == [0.0, 1.0] and fitted.shift.tolist() == [4.0, 0.0]


def test_the_chained_estimate_recovers_older_features_under_an_exact_affine_drift() -> None:
    """f_0 = a_1 ⊙ f_1 + b_1 and f_1 = a_2 ⊙ f_2 + b_2 exactly: from f_2 alone, s = 0 gives f_1 and f_0."""
    generator = np.random.default_rng(1)
    dim = 8
    a1, b1 = generator.uniform(0.5, 1.5, dim) * generator.choice([-1, 1], dim), generator.normal(scale=0.3, size=dim)
    a2, b2 = generator.uniform(0.5, 1.5, dim), generator.normal(scale=0.3, size=dim)

    def models(count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        f2 = generator.normal(size=(count, dim))
        f1 = a2 * f2 + b2
        return a1 * f1 + b1, f1, f2

    # Fitted on each task's own images (model k-1 and model k), applied to other images.
    f0_fit, f1_fit, _ = models(300)
    _, f1_fit2, f2_fit = models(300)
    maps = [fit_backward_map(f1_fit2, f2_fit), fit_backward_map(f0_fit, f1_fit)]  # newest first
    f0, f1, f2 = models(50)
    estimates = estimate_older_features(torch.from_numpy(f2), maps, noise_scale=0.0)
    assert len(estimates) == 2
    np.testing.assert_allclose(estimates[0].numpy(), f1, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(estimates[1].numpy(), f0, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(maps[1].scale, a1, rtol=1e-5)
    assert float(maps[0].residual_std.max()) < 1e-5


def test_the_noise_is_the_residual_std_and_accumulates_along_the_chain() -> None:
    dim = 3
    maps = [
        BackwardMap(scale=np.ones(dim), shift=np.zeros(dim), residual_std=np.array([0.1, 0.2, 0.0])),
        BackwardMap(scale=np.ones(dim), shift=np.zeros(dim), residual_std=np.array([0.1, 0.2, 0.0])),
    ]
    features = torch.zeros(20000, dim, dtype=torch.float64, requires_grad=True)
    estimates = estimate_older_features(features, maps, generator=torch.Generator().manual_seed(0))
    assert all(not estimate.requires_grad and estimate.dtype == torch.float64 for estimate in estimates)
    first, second = (estimate.std(dim=0).numpy() for estimate in estimates)
    np.testing.assert_allclose(first, [0.1, 0.2, 0.0], atol=0.01)
    # Independent noise per step: the variances add along the chain.
    np.testing.assert_allclose(second, np.sqrt(2) * np.array([0.1, 0.2, 0.0]), atol=0.01)
    again = estimate_older_features(features, maps, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again[1], estimates[1], rtol=0, atol=0)
    halved = estimate_older_features(features, maps, noise_scale=0.5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(halved[0], estimates[0] / 2)


def test_estimates_need_the_maps_dimension_and_a_non_negative_scale() -> None:
    backward = BackwardMap(scale=np.ones(3), shift=np.zeros(3), residual_std=np.zeros(3))
    with pytest.raises(ValueError, match=r"features must be \[B, 3\] to match backward map 0, got \[2, 4\]"):
        estimate_older_features(torch.zeros(2, 4), [backward])
    with pytest.raises(ValueError, match="noise_scale must be >= 0, got -1"):
        estimate_older_features(torch.zeros(2, 3), [backward], noise_scale=-1)
    assert estimate_older_features(torch.zeros(2, 3), []) == []


def test_fit_backward_map_rejects_mismatched_embeddings() -> None:
    with pytest.raises(ValueError, match=r"previous \[3, 2\] and current \[3, 4\]"):
        fit_backward_map(np.zeros((3, 2)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="must be finite"):
        fit_backward_map(np.full((3, 2), np.nan), np.zeros((3, 2)))


def test_backward_maps_round_trip_through_json() -> None:
    backward = BackwardMap(scale=np.array([0.5, -1.0]), shift=np.array([0.0, 0.25]), residual_std=np.array([0.125, 0]))
    restored = BackwardMap.from_dict(json.loads(json.dumps(backward.to_dict())))
    for key in ("scale", "shift", "residual_std"):
        np.testing.assert_array_equal(getattr(restored, key), getattr(backward, key))
    assert backward.to_dict() == {"scale": [0.5, -1.0], "shift": [0.0, 0.25], "residual_std": [0.125, 0.0]}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"scale": [0.0, 0.1], "shift": [0.2], "residual_std": [0.0]}, r"same length \[D\]"),
        ({"scale": [0.0], "shift": [0.2], "residual_std": [-0.1]}, "residual_std must be >= 0, but dimension 0"),
        ({"scale": [float("nan")], "shift": [0.2], "residual_std": [0.1]}, "scale holds NaN"),
        (
            {"low": [0.0], "high": [0.2]},
            r"exactly the keys \['residual_std', 'scale', 'shift'\], got \['high', 'low'\]",
        ),
        ({"scale": ["a"], "shift": [0.2], "residual_std": [0.1]}, "must be lists of numbers"),
    ],
)
def test_backward_map_from_dict_names_the_problem(data: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BackwardMap.from_dict(data)


@pytest.mark.parametrize(
    ("count", "gamma", "expected"),
    [
        (0, 0.5, []),
        (1, 0.5, [1.0]),
        (2, 0.5, [1 / 3, 2 / 3]),  # raw 0.25, 0.5
        (3, 0.5, [1 / 7, 2 / 7, 4 / 7]),  # raw 0.125, 0.25, 0.5
        (2, 1.0, [0.5, 0.5]),
    ],
)
def test_descending_weights_halve_with_each_step_back_and_sum_to_one(
    count: int, gamma: float, expected: list[float]
) -> None:
    assert descending_weights(count, gamma=gamma) == pytest.approx(expected)


def test_descending_weights_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="count must be >= 0, got -1"):
        descending_weights(-1)
    with pytest.raises(ValueError, match="gamma must be > 0, got 0"):
        descending_weights(2, gamma=0)

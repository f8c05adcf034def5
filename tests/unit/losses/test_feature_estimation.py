"""Feature estimation (thesis ch. 6, our specification): drift statistics, estimates and weights.

Drift statistics are checked against `np.quantile` over a relative change computed element by
element in a loop; estimates against their element-wise bounds `f + low*f .. f + high*f`; the
descending weights against hand values.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from retrieval.losses.feature_estimation import (
    DriftStatistics,
    descending_weights,
    drift_statistics,
    estimate_features,
)


def test_drift_statistics_are_quantiles_of_the_relative_change_per_dimension() -> None:
    generator = np.random.default_rng(0)
    previous = generator.normal(size=(50, 4))
    previous[3, 1] = 1e-6  # the eps floor must apply here
    current = previous * (1 + generator.normal(scale=0.2, size=previous.shape)) + 0.01
    stats = drift_statistics(previous, current, low_quantile=0.1, high_quantile=0.9, eps=1e-3)

    relative = np.empty_like(previous)
    for row in range(previous.shape[0]):
        for dim in range(previous.shape[1]):
            denominator = max(abs(previous[row, dim]), 1e-3)
            relative[row, dim] = (current[row, dim] - previous[row, dim]) / denominator
    for dim in range(previous.shape[1]):
        assert stats.low[dim] == pytest.approx(np.quantile(relative[:, dim], 0.1), rel=1e-6)
        assert stats.high[dim] == pytest.approx(np.quantile(relative[:, dim], 0.9), rel=1e-6)
    assert stats.low.dtype == np.float32 and stats.low.shape == (4,)


def test_drift_statistics_reject_mismatched_embeddings_and_quantiles() -> None:
    with pytest.raises(ValueError, match=r"previous \[3, 2\] and current \[3, 4\]"):
        drift_statistics(np.zeros((3, 2)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"low_quantile=0\.9, high_quantile=0\.1"):
        drift_statistics(np.zeros((3, 2)), np.zeros((3, 2)), low_quantile=0.9, high_quantile=0.1)


def test_drift_statistics_round_trip_through_json() -> None:
    stats = DriftStatistics(low=np.array([-0.25, 0.0]), high=np.array([0.5, 0.125]))
    restored = DriftStatistics.from_dict(json.loads(json.dumps(stats.to_dict())))
    np.testing.assert_array_equal(restored.low, stats.low)
    np.testing.assert_array_equal(restored.high, stats.high)
    assert stats.to_dict() == {"low": [-0.25, 0.0], "high": [0.5, 0.125]}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"low": [0.0, 0.1], "high": [0.2]}, r"same length \[D\], got shapes \[2\] and \[1\]"),
        ({"low": [0.0, 0.3], "high": [0.2, 0.2]}, "low <= high, but 1 dimensions break it, the first being 1"),
        ({"low": [0.0, float("nan")], "high": [0.2, 0.2]}, "must be finite"),
        (
            {"low": [0.0], "high": [0.2], "gamma": 1},
            r"exactly the keys \['high', 'low'\], got \['gamma', 'high', 'low'\]",
        ),
        ({"low": ["a"], "high": [0.2]}, "must be lists of numbers"),
    ],
)
def test_drift_statistics_from_dict_names_the_problem(data: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DriftStatistics.from_dict(data)


def test_estimated_features_lie_between_the_recorded_drift_bounds_whatever_the_sign() -> None:
    features = torch.tensor([[1.0, -2.0, 0.5], [-0.5, 3.0, -1.0]], dtype=torch.float64, requires_grad=True)
    stats = DriftStatistics(low=np.array([-0.2, 0.1, -0.5]), high=np.array([0.3, 0.4, -0.1]))
    estimate = estimate_features(features, stats, generator=torch.Generator().manual_seed(0))
    assert estimate.dtype == torch.float64 and not estimate.requires_grad

    plain = features.detach().numpy()
    low_end = plain + stats.low.astype(np.float64) * plain
    high_end = plain + stats.high.astype(np.float64) * plain
    lower, upper = np.minimum(low_end, high_end), np.maximum(low_end, high_end)
    values = estimate.numpy()
    assert np.all(values >= lower - 1e-7) and np.all(values <= upper + 1e-7)
    assert not np.allclose(values, plain)


def test_estimated_features_are_deterministic_for_a_seeded_generator_and_scale_the_drift() -> None:
    features = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    stats = DriftStatistics(low=np.full(4, 0.1), high=np.full(4, 0.3))
    first = estimate_features(features, stats, generator=torch.Generator().manual_seed(7))
    second = estimate_features(features, stats, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    halved = estimate_features(features, stats, scale=0.5, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(halved - features, (first - features) / 2)
    assert torch.equal(estimate_features(features, stats, scale=0.0), features)


def test_estimate_features_needs_the_statistics_dimension() -> None:
    stats = DriftStatistics(low=np.zeros(3), high=np.ones(3))
    with pytest.raises(ValueError, match=r"features must be \[B, 3\] to match the drift statistics, got \[2, 4\]"):
        estimate_features(torch.zeros(2, 4), stats)


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

"""MAC, SPoC, R-MAC and CroW against plain loops over images, channels, positions and regions.

Also the off-the-shelf embedding (no linear head) and the pooling fields of `ModelSpec`.
"""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from retrieval.config import ModelSpec
from retrieval.models.embedding import EmbeddingNetwork
from retrieval.models.pooling import MAC, RMAC, CroW, GeM, SPoC, build_pooling, rmac_regions, spoc_center_prior

ATOL = 1e-10


def _feature_map(*, height: int = 5, width: int = 7, channels: int = 3, seed: int = 0) -> torch.Tensor:
    """Post-ReLU-like float64 activations with exact zeros, `[2, C, H, W]`."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, channels, height, width, generator=generator, dtype=torch.float64).clamp(min=0.0)


def _values(features: torch.Tensor, image: int, channel: int) -> list[list[float]]:
    return features[image, channel].tolist()


def test_mac_is_the_maximum_of_every_channel() -> None:
    features = _feature_map()
    pooled = MAC()(features)
    assert pooled.shape == (2, 3)
    for image in range(2):
        for channel in range(3):
            expected = max(max(row) for row in _values(features, image, channel))
            assert pooled[image, channel].item() == expected


def test_spoc_without_prior_is_the_mean_of_every_channel() -> None:
    features = _feature_map()
    pooled = SPoC()(features)
    for image in range(2):
        for channel in range(3):
            rows = _values(features, image, channel)
            expected = sum(sum(row) for row in rows) / (len(rows) * len(rows[0]))
            assert math.isclose(pooled[image, channel].item(), expected, rel_tol=1e-12)


def test_spoc_centre_prior_weighs_positions_by_a_gaussian_with_sigma_a_third_of_the_centre_border_distance() -> None:
    height, width = 5, 7
    features = _feature_map(height=height, width=width)
    pooled = SPoC(center_prior=True)(features)
    # Cell (y, x) has its centre at (y + 0.5, x + 0.5); the map's centre is (H / 2, W / 2), and the
    # closest border is min(H, W) / 2 away, so sigma = min(H, W) / 6.
    sigma = min(height, width) / 2 / 3
    weights = [
        [math.exp(-((y + 0.5 - height / 2) ** 2 + (x + 0.5 - width / 2) ** 2) / (2 * sigma**2)) for x in range(width)]
        for y in range(height)
    ]
    total_weight = sum(sum(row) for row in weights)
    for image in range(2):
        for channel in range(3):
            rows = _values(features, image, channel)
            weighted = sum(weights[y][x] * rows[y][x] for y in range(height) for x in range(width))
            assert math.isclose(pooled[image, channel].item(), weighted / total_weight, rel_tol=1e-12)


def test_spoc_centre_prior_peaks_at_the_centre_and_sums_to_one() -> None:
    prior = spoc_center_prior(height=5, width=5, dtype=torch.float64)
    assert math.isclose(prior.sum().item(), 1.0, rel_tol=1e-12)
    assert prior.argmax().item() == 12  # the centre cell (2, 2)
    torch.testing.assert_close(prior, prior.T)
    torch.testing.assert_close(prior, prior.flip(0))
    assert spoc_center_prior(height=1, width=1).item() == 1.0


# Hand-computed R-MAC grids. 6x10, L=3: the overlap errors |0.6 - b / 6| for 2..7 regions along
# the long side (spacing b = 4, 2, 4/3, 1, 0.8, 2/3) are smallest for 2 regions, so one extra
# region per level along the width. Level 1: side 6, lefts 0, 4. Level 2: side 4, tops 0, 2
# (spacing 2), lefts 0, 3, 6 (spacing 3). Level 3: side 3, tops floor(0, 1.5, 3), lefts floor(0, 7/3,
# 14/3, 7).
GRID_6X10_L3 = [
    (0, 0, 6), (0, 4, 6),
    (0, 0, 4), (0, 3, 4), (0, 6, 4), (2, 0, 4), (2, 3, 4), (2, 6, 4),
    (0, 0, 3), (0, 2, 3), (0, 4, 3), (0, 7, 3),
    (1, 0, 3), (1, 2, 3), (1, 4, 3), (1, 7, 3),
    (3, 0, 3), (3, 2, 3), (3, 4, 3), (3, 7, 3),
]  # fmt: skip
# 7x7 (square: no extra regions), L=3: sides 7, 4, 3 with 1, 2x2, 3x3 regions.
GRID_7X7_L3 = [
    (0, 0, 7),
    (0, 0, 4), (0, 3, 4), (3, 0, 4), (3, 3, 4),
    (0, 0, 3), (0, 2, 3), (0, 4, 3), (2, 0, 3), (2, 2, 3), (2, 4, 3), (4, 0, 3), (4, 2, 3), (4, 4, 3),
]  # fmt: skip


@pytest.mark.parametrize(
    ("height", "width", "levels", "expected"),
    [(6, 10, 3, GRID_6X10_L3), (7, 7, 3, GRID_7X7_L3), (7, 7, 1, GRID_7X7_L3[:1])],
)
def test_rmac_regions_of_hand_computed_grids(
    height: int, width: int, levels: int, expected: list[tuple[int, int, int]]
) -> None:
    assert rmac_regions(height=height, width=width, levels=levels) == expected


def test_rmac_regions_of_a_tall_map_are_the_transposed_wide_ones() -> None:
    wide = rmac_regions(height=6, width=10, levels=3)
    tall = rmac_regions(height=10, width=6, levels=3)
    assert sorted(tall) == sorted((left, top, side) for top, left, side in wide)


def test_rmac_regions_round_in_float32_like_the_reference_implementation() -> None:
    # 2x32, level 2: side 1 and 8 regions along the width, spacing 31/7. In exact arithmetic the
    # last region starts at 31; cnnimageretrieval-pytorch computes floor(-1 + 7 * (31/7)) + 1 in
    # float32, which gives 30, and its R-MAC vectors are what published results use.
    level_two = [region for region in rmac_regions(height=2, width=32, levels=2) if region[2] == 1]
    assert [left for top, left, _ in level_two if top == 0] == [0, 4, 8, 13, 17, 22, 26, 30]


@pytest.mark.parametrize(("height", "width"), [(6, 10), (7, 7), (9, 4), (1, 3), (2, 32)])
def test_rmac_regions_lie_inside_the_map(height: int, width: int) -> None:
    regions = rmac_regions(height=height, width=width, levels=3)
    assert regions
    for top, left, side in regions:
        assert side >= 1 and 0 <= top <= height - side and 0 <= left <= width - side


def test_rmac_is_the_sum_of_normalised_regional_maxima_including_the_whole_map() -> None:
    height, width, levels, eps = 6, 10, 3, 1e-6
    features = _feature_map(height=height, width=width, channels=4)
    pooled = RMAC(levels=levels, eps=eps)(features)
    regions = [(0, 0, height, width)] + [(top, left, side, side) for top, left, side in GRID_6X10_L3]
    for image in range(2):
        expected = [0.0] * 4
        for top, left, region_height, region_width in regions:
            maxima = [
                max(
                    features[image, channel, y, x].item()
                    for y in range(top, top + region_height)
                    for x in range(left, left + region_width)
                )
                for channel in range(4)
            ]
            norm = math.sqrt(sum(value**2 for value in maxima))
            expected = [total + value / (norm + eps) for total, value in zip(expected, maxima, strict=True)]
        for channel in range(4):
            assert math.isclose(pooled[image, channel].item(), expected[channel], rel_tol=1e-12)


def test_crow_matches_the_spatial_and_channel_weighting_of_the_paper() -> None:
    height, width, channels, eps = 4, 5, 4, 1e-6
    features = _feature_map(height=height, width=width, channels=channels, seed=3)
    features[1, 2] = 0.0  # a channel that never fires
    pooled = CroW(eps=eps)(features)
    for image in range(2):
        # Spatial weights, a = b = 2: S = sum_k X_k, alpha = sqrt(S / ||S||_2).
        summed = [
            [sum(features[image, k, y, x].item() for k in range(channels)) for x in range(width)] for y in range(height)
        ]
        norm = math.sqrt(sum(value**2 for row in summed for value in row))
        alpha = [[math.sqrt(value / norm) for value in row] for row in summed]
        # Channel weights: Q_k = fraction of non-zero positions, beta_k = log(sum Q / (Q_k + eps)).
        fractions = [
            sum(1 for y in range(height) for x in range(width) if features[image, k, y, x].item() > 0)
            / (height * width)
            for k in range(channels)
        ]
        for k in range(channels):
            beta = math.log(sum(fractions) / (fractions[k] + eps))
            weighted_sum = sum(
                alpha[y][x] * features[image, k, y, x].item() for y in range(height) for x in range(width)
            )
            assert math.isclose(pooled[image, k].item(), beta * weighted_sum, rel_tol=1e-9, abs_tol=ATOL)
    assert pooled[1, 2].item() == 0.0


def test_crow_of_an_all_zero_map_is_zero_not_nan() -> None:
    pooled = CroW()(torch.zeros(1, 3, 4, 4))
    assert torch.equal(pooled, torch.zeros(1, 3))


def test_crow_ignores_negative_activations() -> None:
    features = _feature_map(seed=5)
    with_negatives = features - 2.0 * (features == 0).to(features.dtype)
    torch.testing.assert_close(CroW()(with_negatives), CroW()(features))


@pytest.mark.parametrize(
    ("name", "kind"),
    [("mac", MAC), ("max", MAC), ("spoc", SPoC), ("avg", SPoC), ("gem", GeM), ("rmac", RMAC), ("crow", CroW)],
)
def test_build_pooling_names_and_aliases(name: str, kind: type) -> None:
    assert isinstance(build_pooling(name=name), kind)


def test_build_pooling_passes_its_options_through() -> None:
    spoc = build_pooling(name="spoc", spoc_center_prior=True)
    rmac = build_pooling(name="rmac", rmac_levels=2)
    assert isinstance(spoc, SPoC) and spoc.center_prior
    assert isinstance(rmac, RMAC) and rmac.levels == 2


def test_build_pooling_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown pooling 'vlad'; expected one of mac, spoc, gem, rmac, crow"):
        build_pooling(name="vlad")


@pytest.mark.parametrize("name", ["mac", "spoc", "gem", "rmac", "crow"])
def test_every_pooling_maps_a_feature_map_to_one_finite_vector_and_passes_gradients(name: str) -> None:
    features = (torch.rand(3, 8, 6, 9, dtype=torch.float64) + 0.05).requires_grad_(True)
    pooled = build_pooling(name=name)(features)
    assert pooled.shape == (3, 8)
    assert torch.isfinite(pooled).all()
    pooled.sum().backward()
    assert features.grad is not None and features.grad.abs().sum().item() > 0


def test_model_spec_pooling_fields() -> None:
    spec = ModelSpec()
    assert (spec.pooling, spec.spoc_center_prior, spec.rmac_levels, spec.embedding_dim) == ("gem", False, 3, 128)
    for name in ("mac", "spoc", "gem", "rmac", "crow", "max", "avg"):
        assert ModelSpec.model_validate({"pooling": name}).pooling == name
    assert ModelSpec.model_validate({"embedding_dim": None}).embedding_dim is None
    with pytest.raises(ValidationError, match="pooling"):
        ModelSpec.model_validate({"pooling": "vlad"})
    with pytest.raises(ValidationError, match="rmac_levels"):
        ModelSpec.model_validate({"rmac_levels": 0})


@pytest.mark.parametrize("pooling", ["mac", "rmac", "crow"])
def test_off_the_shelf_network_embeds_the_normalised_pooled_feature(pooling: str) -> None:
    torch.manual_seed(0)
    spec = ModelSpec.model_validate({"backbone": "resnet18", "pooling": pooling, "embedding_dim": None})
    network = EmbeddingNetwork.from_spec(spec).eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        embeddings = network(images)
        pooled = build_pooling(name=pooling)(network.trunk(images))
    assert network.embedding_dim == 512
    assert embeddings.shape == (3, 512)
    assert not any(isinstance(module, torch.nn.Linear) for module in network.modules())
    for row in range(3):
        norm = math.sqrt(sum(value**2 for value in pooled[row].tolist()))
        torch.testing.assert_close(embeddings[row], pooled[row] / norm)

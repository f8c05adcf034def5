"""Pooling, backbones and the embedding network: shapes, norms and GeM against its definition."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from retrieval.config import ModelSpec
from retrieval.models import EmbeddingNetwork, GeM, build_backbone, build_pooling

# GeM keeps `p` as a float32 parameter, so even float64 maps pool to float32-level precision.
REL_TOL = 1e-6


def _positive_features(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, 4, 4, generator=generator, dtype=torch.float64) + 0.1


def test_gem_of_a_hand_computed_2x2_map() -> None:
    features = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=torch.float64)
    pooled = GeM(p=3.0)(features)
    assert pooled.shape == (1, 1)
    # ((1 + 8 + 27 + 64) / 4) ** (1 / 3) = 25 ** (1 / 3)
    assert math.isclose(pooled.item(), 25.0 ** (1.0 / 3.0), rel_tol=REL_TOL)


def test_gem_matches_its_definition_per_channel() -> None:
    features = _positive_features()
    pooled = GeM(p=2.5)(features)
    for image in range(features.shape[0]):
        for channel in range(features.shape[1]):
            values = features[image, channel].flatten().tolist()
            expected = (sum(value**2.5 for value in values) / len(values)) ** (1 / 2.5)
            assert math.isclose(pooled[image, channel].item(), expected, rel_tol=REL_TOL)


def test_gem_with_p_1_is_average_pooling() -> None:
    features = _positive_features()
    torch.testing.assert_close(GeM(p=1.0)(features), features.mean(dim=(-2, -1)))


def test_gem_with_large_p_approaches_max_pooling() -> None:
    features = _positive_features()
    maximum = features.amax(dim=(-2, -1))
    cells = features.shape[-1] * features.shape[-2]
    previous_gap = None
    for p in (10.0, 100.0, 500.0):
        pooled = GeM(p=p)(features)
        # mean(x^p)^(1/p) lies between max * N^(-1/p) and max.
        assert torch.all(pooled <= maximum * (1 + REL_TOL))
        assert torch.all(pooled >= maximum * cells ** (-1.0 / p) * (1 - REL_TOL))
        gap = (maximum - pooled).abs().max().item()
        if previous_gap is not None:
            assert gap < previous_gap
        previous_gap = gap
    assert previous_gap is not None and previous_gap < 0.01 * maximum.min().item()


def test_gem_floors_non_positive_activations_at_eps() -> None:
    features = torch.tensor([[[[-1.0, 0.0], [0.0, -3.0]]]])
    pooled = GeM(p=3.0, eps=1e-6)(features)
    assert math.isclose(pooled.item(), 1e-6, rel_tol=1e-4)


def test_gem_exponent_is_learnable_or_frozen() -> None:
    learnable = GeM(p=3.0)
    learnable(_positive_features()).sum().backward()
    assert learnable.p.grad is not None and learnable.p.grad.item() != 0.0
    assert GeM(p=3.0, learnable=False).p.requires_grad is False


@pytest.mark.parametrize(("name", "reference"), [("avg", nn.AdaptiveAvgPool2d(1)), ("max", nn.AdaptiveMaxPool2d(1))])
def test_build_pooling_by_name(name: str, reference: nn.Module) -> None:
    features = _positive_features()
    torch.testing.assert_close(build_pooling(name=name)(features), reference(features).flatten(1))


def test_build_pooling_gem_uses_the_given_exponent() -> None:
    pooling = build_pooling(name="gem", gem_p=4.0)
    assert isinstance(pooling, GeM)
    assert pooling.p.item() == 4.0


def test_build_pooling_unknown_name_errors() -> None:
    with pytest.raises(ValueError, match="unknown pooling 'netvlad'"):
        build_pooling(name="netvlad")


def test_build_backbone_unknown_name_errors() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'resnet_unknown'"):
        build_backbone(name="resnet_unknown")


@pytest.mark.parametrize(("name", "channels"), [("resnet18", 512), ("vgg11", 512)])
def test_backbone_trunk_gives_a_feature_map_with_the_reported_channels(name: str, channels: int) -> None:
    trunk, reported = build_backbone(name=name, weights=None)
    assert reported == channels
    feature_map = trunk(torch.zeros(2, 3, 64, 64))
    # Both families downsample by 32: a 64x64 image gives a 2x2 map.
    assert feature_map.shape == (2, channels, 2, 2)
    assert trunk.training


def test_embedding_network_outputs_unit_norm_vectors() -> None:
    torch.manual_seed(0)
    network = EmbeddingNetwork.from_spec(ModelSpec.model_validate({"backbone": "resnet18", "embedding_dim": 24}))
    network.eval()
    with torch.no_grad():
        embeddings = network(torch.randn(5, 3, 32, 32))
    assert embeddings.shape == (5, 24)
    assert embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(5))
    assert network.embedding_dim == 24
    assert isinstance(network.pool, GeM) and network.pool.p.item() == 3.0

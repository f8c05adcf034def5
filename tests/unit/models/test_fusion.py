"""Layer-level fusion against a layer-by-layer run of the backbone; late fusion against plain loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision
from pydantic import ValidationError

from retrieval.config import ModelSpec
from retrieval.errors import ConfigError
from retrieval.models.embedding import EmbeddingNetwork
from retrieval.models.fusion import LayerFusion, build_layer_fusion, late_fusion
from retrieval.models.pooling import MAC


def _normalised_channel_maxima(feature_map: torch.Tensor) -> list[list[float]]:
    """Per image: the max of every channel, divided by the vector's norm (plain loops)."""
    rows = []
    for image in range(feature_map.shape[0]):
        maxima = [feature_map[image, channel].max().item() for channel in range(feature_map.shape[1])]
        norm = math.sqrt(sum(value**2 for value in maxima))
        rows.append([value / norm for value in maxima])
    return rows


def test_resnet_layer3_and_layer4_are_pooled_normalised_and_concatenated() -> None:
    torch.manual_seed(0)
    fusion, channels = build_layer_fusion(
        backbone="resnet18", weights=None, layers=["layer3", "layer4"], make_pooling=MAC
    )
    assert channels == 256 + 512
    fusion.eval()
    # The same weights in a plain torchvision ResNet, run stage by stage.
    reference = torchvision.models.resnet18(weights=None).eval()
    missing, unexpected = reference.load_state_dict(fusion.extractor.state_dict(), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused = fusion(images)
        hidden = reference.maxpool(reference.relu(reference.bn1(reference.conv1(images))))
        layer3 = reference.layer3(reference.layer2(reference.layer1(hidden)))
        layer4 = reference.layer4(layer3)
    expected = [
        left + right
        for left, right in zip(_normalised_channel_maxima(layer3), _normalised_channel_maxima(layer4), strict=True)
    ]
    assert fused.shape == (2, channels)
    torch.testing.assert_close(fused, torch.tensor(expected, dtype=fused.dtype))
    # Each layer's block has unit norm, so the whole vector has norm sqrt(2).
    torch.testing.assert_close(fused[:, :256].norm(dim=1), torch.ones(2))
    torch.testing.assert_close(fused.norm(dim=1), torch.full((2,), math.sqrt(2.0)))


def test_vgg_feature_indices_can_be_fused() -> None:
    torch.manual_seed(0)
    fusion, channels = build_layer_fusion(
        backbone="vgg11", weights=None, layers=["features.10", "features.20"], make_pooling=MAC
    )
    assert channels == 256 + 512
    fusion.eval()
    images = torch.randn(2, 3, 32, 32)
    taps = {}
    with torch.no_grad():
        fused = fusion(images)
        # Every child of VGG's `features` is a leaf layer, which the extractor keeps by its index.
        hidden = images
        for index in range(21):
            hidden = getattr(fusion.extractor.features, str(index))(hidden)
            taps[index] = hidden
    expected = [
        left + right
        for left, right in zip(_normalised_channel_maxima(taps[10]), _normalised_channel_maxima(taps[20]), strict=True)
    ]
    torch.testing.assert_close(fused, torch.tensor(expected, dtype=fused.dtype))


def test_each_fused_layer_gets_its_own_pooling_layer() -> None:
    fusion, _ = build_layer_fusion(
        backbone="resnet18", weights=None, layers=["layer4", "layer2"], make_pooling=lambda: torch.nn.Identity()
    )
    assert isinstance(fusion, LayerFusion)
    assert fusion.layers == ["layer4", "layer2"]
    assert len(fusion.pools) == 2 and fusion.pools[0] is not fusion.pools[1]


def test_unknown_layer_error_lists_the_available_ones() -> None:
    with pytest.raises(
        ConfigError, match=r"resnet18 has no layer\(s\) \['layer5'\]; available: layer1, layer2, layer3, layer4"
    ):
        build_layer_fusion(backbone="resnet18", weights=None, layers=["layer3", "layer5"], make_pooling=MAC)
    # Networks with a `features` trunk (VGG, MobileNet, ...) name its children by index.
    with pytest.raises(
        ConfigError, match=r"has no layer\(s\) \['layer4'\]; available: features.0, features.1, features.2,"
    ):
        build_layer_fusion(backbone="mobilenet_v3_small", weights=None, layers=["layer4"], make_pooling=MAC)


def test_fusion_layers_in_the_spec() -> None:
    assert ModelSpec().fusion_layers is None
    with pytest.raises(ValidationError, match="each layer once"):
        ModelSpec.model_validate({"fusion_layers": ["layer4", "layer4"]})
    with pytest.raises(ValidationError, match="fusion_layers"):
        ModelSpec.model_validate({"fusion_layers": []})


@pytest.mark.parametrize(("embedding_dim", "expected_dim"), [(None, 768), (32, 32)])
def test_embedding_network_with_layer_fusion(embedding_dim: int | None, expected_dim: int) -> None:
    torch.manual_seed(0)
    spec = ModelSpec.model_validate(
        {
            "backbone": "resnet18",
            "pooling": "gem",
            "fusion_layers": ["layer3", "layer4"],
            "embedding_dim": embedding_dim,
        }
    )
    network = EmbeddingNetwork.from_spec(spec).eval()
    assert network.embedding_dim == expected_dim
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        embeddings = network(images)
        fused = network.trunk(images)
    assert embeddings.shape == (2, expected_dim)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(2))
    if embedding_dim is None:
        torch.testing.assert_close(embeddings, fused / fused.norm(dim=1, keepdim=True))
    else:
        assert network.head.in_features == 768
    # A learnable GeM exponent per fused layer, and every parameter gets a gradient in training.
    network.train()
    network(images).sum().backward()
    assert sum(1 for name, _ in network.named_parameters() if name.endswith(".p")) == 2
    assert all(parameter.grad is not None for parameter in network.parameters() if parameter.requires_grad)


def _plain_normalised(rows: list[list[float]]) -> list[list[float]]:
    result = []
    for row in rows:
        norm = math.sqrt(sum(value**2 for value in row))
        result.append([value / norm for value in row])
    return result


def test_late_fusion_concat_normalises_each_model_then_the_concatenation() -> None:
    generator = np.random.default_rng(0)
    first, second = generator.normal(size=(4, 3)), generator.normal(size=(4, 5))
    fused = late_fusion([first, torch.from_numpy(second)], mode="concat")
    assert fused.shape == (4, 8) and fused.dtype == np.float32
    expected = _plain_normalised(
        [
            left + right
            for left, right in zip(_plain_normalised(first.tolist()), _plain_normalised(second.tolist()), strict=True)
        ]
    )
    np.testing.assert_allclose(fused, np.array(expected), rtol=1e-6, atol=1e-7)


def test_late_fusion_sum_normalises_each_model_then_the_sum() -> None:
    generator = np.random.default_rng(1)
    first, second = generator.normal(size=(4, 6)), generator.normal(size=(4, 6)) * 10.0
    fused = late_fusion([first, second], mode="sum")
    expected = _plain_normalised(
        [
            [a + b for a, b in zip(left, right, strict=True)]
            for left, right in zip(_plain_normalised(first.tolist()), _plain_normalised(second.tolist()), strict=True)
        ]
    )
    np.testing.assert_allclose(fused, np.array(expected), rtol=1e-6, atol=1e-7)


def test_late_fusion_errors_name_the_shapes() -> None:
    with pytest.raises(ValueError, match=r"'sum' needs equal dimensions, got shapes \[\(2, 3\), \(2, 4\)\]"):
        late_fusion([np.ones((2, 3)), np.ones((2, 4))], mode="sum")
    with pytest.raises(ValueError, match=r"same number of rows in every input, got shapes \[\(2, 3\), \(3, 3\)\]"):
        late_fusion([np.ones((2, 3)), np.ones((3, 3))], mode="concat")
    with pytest.raises(ValueError, match="must be a 2-D array"):
        late_fusion([np.ones(3)], mode="concat")
    with pytest.raises(ValueError, match="at least one"):
        late_fusion([], mode="concat")
    with pytest.raises(ValueError, match="'concat' or 'sum'"):
        late_fusion([np.ones((2, 3))], mode="mean")  # type: ignore[arg-type]

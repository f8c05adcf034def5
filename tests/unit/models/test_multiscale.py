"""Multi-scale extraction: one scale is the plain embedding, several are a manual resize-embed-average."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from retrieval.config import ModelSpec
from retrieval.models.embedding import EmbeddingNetwork
from retrieval.models.multiscale import DEFAULT_SCALES, multiscale_embed, resize_batch

THREE_SCALES = (1.0, 1.0 / math.sqrt(2.0), 0.5)


@pytest.fixture(scope="module")
def network() -> EmbeddingNetwork:
    torch.manual_seed(0)
    model = EmbeddingNetwork.from_spec(
        ModelSpec.model_validate({"backbone": "resnet18", "embedding_dim": 16, "scales": list(THREE_SCALES)})
    )
    return model.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 24, generator=torch.Generator().manual_seed(1))


def _manual_multiscale(embed: EmbeddingNetwork, images: torch.Tensor, scales: tuple[float, ...]) -> torch.Tensor:
    """Resize the batch to each scale by hand, embed, average, L2-normalise."""
    height, width = images.shape[-2:]
    total = torch.zeros(images.shape[0], embed.embedding_dim)
    for scale in scales:
        size = (round(height * scale), round(width * scale))
        resized = images if scale == 1.0 else F.interpolate(images, size=size, mode="bilinear", antialias=True)
        total += embed.embed_single_scale(resized)
    mean = total / len(scales)
    return mean / mean.norm(dim=1, keepdim=True)


def test_default_scales_are_one_inverse_root_two_and_a_half() -> None:
    assert pytest.approx((1.0, 0.70710678, 0.5)) == DEFAULT_SCALES


def test_resize_batch_sizes() -> None:
    images = torch.rand(2, 3, 64, 48)
    assert resize_batch(images, scale=1.0) is images
    assert resize_batch(images, scale=0.5).shape == (2, 3, 32, 24)
    assert resize_batch(images, scale=1 / math.sqrt(2)).shape == (2, 3, 45, 34)
    assert resize_batch(torch.rand(1, 3, 2, 2), scale=0.1).shape == (1, 3, 1, 1)


def test_single_scale_is_the_plain_embedding(network: EmbeddingNetwork, images: torch.Tensor) -> None:
    with torch.no_grad():
        expected = network.embed_single_scale(images)
        torch.testing.assert_close(multiscale_embed(network.embed_single_scale, images, scales=[1.0]), expected)


def test_three_scales_are_the_normalised_mean_of_the_resized_embeddings(
    network: EmbeddingNetwork, images: torch.Tensor
) -> None:
    with torch.no_grad():
        expected = _manual_multiscale(network, images, THREE_SCALES)
        actual = multiscale_embed(network.embed_single_scale, images, scales=THREE_SCALES)
        default = multiscale_embed(network.embed_single_scale, images)
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(default, expected)
    torch.testing.assert_close(actual.norm(dim=1), torch.ones(2))
    # The scales matter: the multi-scale embedding is not the single-scale one.
    assert (actual - network.embed_single_scale(images).detach()).abs().max().item() > 1e-3


def test_network_applies_its_scales_in_eval_mode_only(network: EmbeddingNetwork, images: torch.Tensor) -> None:
    with torch.no_grad():
        assert network.scales == THREE_SCALES
        torch.testing.assert_close(network(images), _manual_multiscale(network, images, THREE_SCALES))
        network.train()
        try:
            torch.testing.assert_close(network(images), network.embed_single_scale(images))
        finally:
            network.eval()


def test_network_with_one_scale_other_than_one_resizes(network: EmbeddingNetwork, images: torch.Tensor) -> None:
    original = network.scales
    network.scales = (0.5,)
    try:
        with torch.no_grad():
            torch.testing.assert_close(network(images), _manual_multiscale(network, images, (0.5,)))
    finally:
        network.scales = original


def test_bad_scales_are_rejected(network: EmbeddingNetwork, images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="at least one scale"):
        multiscale_embed(network.embed_single_scale, images, scales=[])
    with pytest.raises(ValueError, match=r"scales must be > 0, got \[1.0, -0.5\]"):
        multiscale_embed(network.embed_single_scale, images, scales=[1.0, -0.5])
    assert ModelSpec().scales == [1.0]
    with pytest.raises(ValidationError, match="scales"):
        ModelSpec.model_validate({"scales": []})
    with pytest.raises(ValidationError, match="scales"):
        ModelSpec.model_validate({"scales": [1.0, 0.0]})

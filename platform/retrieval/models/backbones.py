"""torchvision backbones cut before their classifier, returning a feature map."""

from __future__ import annotations

import logging

import torch
import torchvision
from torch import nn

logger = logging.getLogger(__name__)


def build_backbone(*, name: str, weights: str | None = None) -> tuple[nn.Module, int]:
    """A torchvision classification network without its pooling and classifier.

    Args:
        name: a torchvision model name (`resnet18`, `resnet50`, `vgg16`, `efficientnet_b0`,
            `convnext_tiny`, `densenet121`, ...).
        weights: a torchvision weights name (`DEFAULT`, `IMAGENET1K_V1`) or None for random
            initialisation. Pretrained weights are downloaded by torchvision on first use.

    Returns:
        The trunk, mapping `[B, 3, H, W]` to a feature map `[B, C, h, w]`, and `C`.
    """
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise ValueError(f"unknown backbone {name!r}; torchvision offers e.g. resnet18, resnet50, vgg16")
    if weights is not None:
        logger.info("loading %s weights %s (torchvision downloads them on first use)", name, weights)
    network = torchvision.models.get_model(name, weights=weights)
    if hasattr(network, "layer4") and hasattr(network, "fc"):
        # ResNet family: everything up to the last residual stage.
        trunk: nn.Module = nn.Sequential(*list(network.children())[:-2])
    elif hasattr(network, "features"):
        # VGG, EfficientNet, ConvNeXt, DenseNet, MobileNet: a `features` trunk then a head.
        trunk = network.features
    else:
        raise ValueError(f"backbone {name!r} has no convolutional trunk this platform knows how to cut")
    trunk.eval()
    with torch.no_grad():
        channels = int(trunk(torch.zeros(1, 3, 64, 64)).shape[1])
    trunk.train()
    return trunk, channels

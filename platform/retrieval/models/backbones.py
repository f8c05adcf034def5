"""torchvision backbones cut before their classifier, returning a feature map."""

from __future__ import annotations

import logging

import torch
import torchvision
from torch import nn

from retrieval.config import SMALL_STEM_FAMILIES, StemName, small_stem_supported

logger = logging.getLogger(__name__)


def build_backbone(*, name: str, weights: str | None = None, stem: StemName = "imagenet") -> tuple[nn.Module, int]:
    """A torchvision classification network without its pooling and classifier.

    Args:
        name: a torchvision model name (`resnet18`, `resnet50`, `vgg16`, `efficientnet_b0`,
            `convnext_tiny`, `densenet121`, ...).
        weights: a torchvision weights name (`DEFAULT`, `IMAGENET1K_V1`) or None for random
            initialisation. Pretrained weights are downloaded by torchvision on first use.
        stem: `imagenet` keeps the network's own stem; `small` replaces it for inputs of 64 px
            or less (see `apply_small_stem`). `auto` must be resolved against the image size
            first (`JobSpec` does it) and is refused here.

    Returns:
        The trunk, mapping `[B, 3, H, W]` to a feature map `[B, C, h, w]`, and `C`.

    Raises:
        ValueError: unknown backbone, a `small` stem on a backbone without an ImageNet stem,
            or an unresolved `auto` stem.
    """
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise ValueError(f"unknown backbone {name!r}; torchvision offers e.g. resnet18, resnet50, vgg16")
    if weights is not None:
        logger.info("loading %s weights %s (torchvision downloads them on first use)", name, weights)
    network = torchvision.models.get_model(name, weights=weights)
    network = apply_stem(network, name=name, weights=weights, stem=stem)
    if hasattr(network, "layer4") and hasattr(network, "fc"):
        # ResNet family: everything up to the last residual stage.
        trunk: nn.Module = nn.Sequential(*list(network.children())[:-2])
    elif hasattr(network, "features"):
        # VGG, EfficientNet, ConvNeXt, DenseNet, MobileNet: a `features` trunk then a head.
        trunk = network.get_submodule("features")
    else:
        raise ValueError(f"backbone {name!r} has no convolutional trunk this platform knows how to cut")
    trunk.eval()
    with torch.no_grad():
        channels = int(trunk(torch.zeros(1, 3, 64, 64)).shape[1])
    trunk.train()
    return trunk, channels


def apply_stem(network: nn.Module, *, name: str, weights: str | None, stem: StemName) -> nn.Module:
    """The torchvision `network` with the stem `stem` (in place; returned for chaining).

    `imagenet` leaves it as built. `small` is the CIFAR ResNet stem (He et al. 2016, sec. 4.2):
    the 7x7 stride-2 first convolution becomes a 3x3 stride-1 one and the stride-2 max-pool
    is removed, so the network downsamples 8x instead of 32x and a 32 px image leaves a 4x4
    last feature map (resnet18) instead of 1x1. It applies to the families with that ImageNet
    stem: ResNet, ResNeXt, Wide ResNet (`conv1` + `maxpool`) and DenseNet (`features.conv0` +
    `features.pool0`).

    With pretrained `weights`, the new first convolution has a different shape from the
    pretrained 7x7 one, so it is freshly initialised (Kaiming normal, as torchvision does):
    every other layer keeps its pretrained weights. This is logged.

    Raises:
        ValueError: `small` on a backbone without that stem (the message names it and lists the
            families that have one), or `auto` (resolve it against the image size first).
    """
    if stem == "imagenet":
        return network
    if stem == "auto":
        raise ValueError(
            f"model.stem 'auto' for {name!r} must be resolved against the image size before building "
            "(a JobSpec does it: 'small' for images of 64 px or less, else 'imagenet')"
        )
    if stem != "small":
        raise ValueError(f"unknown model.stem {stem!r}; expected 'imagenet', 'small' or 'auto'")
    if not small_stem_supported(name):
        raise ValueError(small_stem_refusal(name))
    # ResNet family: `conv1` ... `maxpool`; DenseNet: `features.conv0` ... `features.pool0`.
    for parent_name, conv_name, pool_name in (("", "conv1", "maxpool"), ("features", "conv0", "pool0")):
        parent = network if not parent_name else getattr(network, parent_name, None)
        first = getattr(parent, conv_name, None)
        if parent is not None and isinstance(first, nn.Conv2d) and hasattr(parent, pool_name):
            setattr(parent, conv_name, _small_first_convolution(first))
            setattr(parent, pool_name, nn.Identity())
            break
    else:
        raise ValueError(small_stem_refusal(name))
    if weights is not None:
        logger.warning(
            "%s with model.stem 'small': the first convolution is replaced by a 3x3 stride-1 one and freshly "
            "initialised; the pretrained %s weights are kept for every other layer",
            name,
            weights,
        )
    else:
        logger.info("%s with model.stem 'small' (3x3 stride-1 first convolution, no max-pool)", name)
    return network


def small_stem_refusal(name: str) -> str:
    """The error for a `small` stem on a backbone that has no ImageNet stem to replace."""
    return (
        f"model.stem 'small' is not available for backbone {name!r}: it replaces the 7x7 stride-2 convolution "
        f"and max-pool of the {', '.join(SMALL_STEM_FAMILIES)} families (e.g. resnet18, densenet121); "
        f"use model.stem 'imagenet' with {name!r}"
    )


def _small_first_convolution(original: nn.Conv2d) -> nn.Conv2d:
    convolution = nn.Conv2d(
        original.in_channels, original.out_channels, kernel_size=3, stride=1, padding=1, bias=original.bias is not None
    )
    nn.init.kaiming_normal_(convolution.weight, mode="fan_out", nonlinearity="relu")
    if convolution.bias is not None:
        nn.init.zeros_(convolution.bias)
    return convolution

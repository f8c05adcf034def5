"""Feature fusion (thesis ch. 2): layer-level within one backbone, late fusion across models.

Layer-level fusion pools the feature maps of several layers of one backbone and concatenates
the L2-normalised pooled vectors (e.g. ResNet `layer3` + `layer4`), so that mid-level and
semantic features both reach the embedding. Late fusion combines the normalised embeddings of
separately run models by concatenation or summation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from retrieval.config import StemName
from retrieval.errors import ConfigError
from retrieval.models.backbones import apply_stem

logger = logging.getLogger(__name__)

FusionMode = Literal["concat", "sum"]


def fusion_layer_names(network: nn.Module) -> list[str]:
    """The layers of a torchvision classification network that layer fusion can tap.

    ResNet-style networks: their stages `layer1`..`layer4`. Networks with a `features` trunk
    (VGG, EfficientNet, ConvNeXt, DenseNet, MobileNet): every child of it, `features.<name>`
    (for VGG-16, `features.23` is the 4th max-pool, `features.29` the last ReLU).
    """
    if hasattr(network, "layer4") and hasattr(network, "fc"):
        return [name for name, _ in network.named_children() if name.startswith("layer")]
    features = getattr(network, "features", None)
    if isinstance(features, nn.Module):
        return [f"features.{name}" for name, _ in features.named_children()]
    return []


class LayerFusion(nn.Module):
    """Pools several layers of one backbone and concatenates the L2-normalised vectors.

    Maps images `[B, 3, H, W]` to `[B, sum_l C_l]`, the layers in the order given.

    Args:
        extractor: returns a dict from layer name to feature map `[B, C_l, h_l, w_l]`.
        layers: the layer names, in concatenation order.
        pools: one pooling layer per name, `[B, C_l, h_l, w_l] -> [B, C_l]`.
    """

    def __init__(self, *, extractor: nn.Module, layers: Sequence[str], pools: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(layers) != len(pools):
            raise ValueError(f"need one pooling layer per fused layer, got {len(layers)} layers, {len(pools)} pools")
        self.extractor = extractor
        self.layers = list(layers)
        self.pools = nn.ModuleList(pools)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` -> `[B, sum_l C_l]`; each layer's block has unit norm."""
        maps = self.extractor(images)
        pooled = [F.normalize(pool(maps[name]), dim=-1) for name, pool in zip(self.layers, self.pools, strict=True)]
        return torch.cat(pooled, dim=-1)

    def extra_repr(self) -> str:
        return f"layers={self.layers}"


def build_layer_fusion(
    *,
    backbone: str,
    weights: str | None,
    layers: Sequence[str],
    make_pooling: Callable[[], nn.Module],
    stem: StemName = "imagenet",
) -> tuple[LayerFusion, int]:
    """A torchvision backbone that returns the fused pooled features of `layers`.

    Args:
        backbone: a torchvision model name (`resnet50`, `vgg16`, ...).
        weights: a torchvision weights name or None for random initialisation.
        layers: layer names, at least one, each once (see `fusion_layer_names`).
        make_pooling: builds a fresh pooling layer; one per fused layer, so a learnable GeM
            exponent is learnt per layer.
        stem: `imagenet` or `small` (see `models.backbones.apply_stem`).

    Returns:
        The fused trunk `[B, 3, H, W] -> [B, C]` and `C`, the sum of the layers' channels.

    Raises:
        ConfigError: no layer, a repeated layer, or a name the backbone does not have; the
            message lists the available names.
        ValueError: unknown backbone.
    """
    if not layers:
        raise ConfigError("model.fusion_layers must name at least one layer")
    if len(set(layers)) != len(layers):
        raise ConfigError(f"model.fusion_layers must name each layer once, got {list(layers)}")
    if backbone not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"unknown backbone {backbone!r}; torchvision offers e.g. resnet18, resnet50, vgg16")
    if weights is not None:
        logger.info("loading %s weights %s (torchvision downloads them on first use)", backbone, weights)
    network = apply_stem(
        torchvision.models.get_model(backbone, weights=weights), name=backbone, weights=weights, stem=stem
    )
    available = fusion_layer_names(network)
    unknown = [name for name in layers if name not in available]
    if unknown:
        raise ConfigError(
            f"model.fusion_layers: {backbone} has no layer(s) {unknown}; available: {', '.join(available) or 'none'}"
        )
    extractor = create_feature_extractor(network, return_nodes={name: name for name in layers})
    extractor.eval()
    with torch.no_grad():
        maps = extractor(torch.zeros(1, 3, 64, 64))
    extractor.train()
    channels = sum(int(maps[name].shape[1]) for name in layers)
    fusion = LayerFusion(extractor=extractor, layers=layers, pools=[make_pooling() for _ in layers])
    return fusion, channels


def late_fusion(embeddings: Sequence[np.ndarray | torch.Tensor], *, mode: FusionMode = "concat") -> np.ndarray:
    """Model-level late fusion of the embeddings of several models for the same N items.

    Each input is L2-normalised row by row, then the inputs are concatenated (`[N, sum_m D_m]`)
    or summed (`[N, D]`, equal dimensions needed), and the result is L2-normalised again.

    Args:
        embeddings: one `[N, D_m]` array or tensor per model, rows in the same item order.
        mode: "concat" or "sum".

    Returns:
        `[N, D']` float32 numpy array, unit-norm rows.

    Raises:
        ValueError: no inputs, an input that is not 2-D, different N, unequal dimensions for
            "sum", or an unknown mode.

    >>> print(late_fusion([np.array([[3.0, 4.0]]), np.array([[1.0, 0.0]])], mode="sum").round(4))
    [[0.8944 0.4472]]
    """
    if mode not in ("concat", "sum"):
        raise ValueError(f"late fusion mode must be 'concat' or 'sum', got {mode!r}")
    if len(embeddings) == 0:
        raise ValueError("late fusion needs at least one embedding matrix")
    matrices = [_as_float64_matrix(item, position=position) for position, item in enumerate(embeddings)]
    shapes = [matrix.shape for matrix in matrices]
    if len({shape[0] for shape in shapes}) != 1:
        raise ValueError(f"late fusion needs the same number of rows in every input, got shapes {shapes}")
    if mode == "sum" and len({shape[1] for shape in shapes}) != 1:
        raise ValueError(
            f"late fusion mode 'sum' needs equal dimensions, got shapes {shapes}; use mode 'concat' instead"
        )
    normalised = [_l2_normalise(matrix) for matrix in matrices]
    fused = np.concatenate(normalised, axis=1) if mode == "concat" else np.sum(normalised, axis=0)
    return _l2_normalise(fused).astype(np.float32)


def _as_float64_matrix(item: np.ndarray | torch.Tensor, *, position: int) -> np.ndarray:
    array = item.detach().cpu().numpy() if isinstance(item, torch.Tensor) else np.asarray(item)
    if array.ndim != 2:
        raise ValueError(f"late fusion input {position} must be a 2-D array [N, D], got shape {array.shape}")
    return array.astype(np.float64)


def _l2_normalise(matrix: np.ndarray) -> np.ndarray:
    # A zero row stays zero instead of becoming NaN.
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.maximum(norms, 1e-12)

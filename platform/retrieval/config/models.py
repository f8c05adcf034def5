"""Model settings: the `model` section of a job spec (`ModelSpec`: backbone, pooling, head, stem,
multi-scale extraction). The models are built in `retrieval.models`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from retrieval.config.base import StrictModel

StemName = Literal["auto", "imagenet", "small"]

# Backbone families whose ImageNet stem (7x7 stride-2 convolution, then a stride-2 max-pool) the
# `small` stem replaces (models.backbones.apply_stem); torchvision names start with these.
SMALL_STEM_FAMILIES: tuple[str, ...] = ("resnet", "resnext", "wide_resnet", "densenet")

# `model.stem: auto` is `small` when every image the job trains on is at most this many pixels.
SMALL_STEM_MAX_IMAGE_SIZE = 64


def small_stem_supported(backbone: str) -> bool:
    """Whether `model.stem: small` applies to a torchvision backbone name (`resnet18`: yes, `vgg16`: no)."""
    return backbone.startswith(SMALL_STEM_FAMILIES)


class ModelSpec(StrictModel):
    """Backbone, pooling, optional layer fusion, embedding head and multi-scale extraction.

    `pooling` names: `mac` (alias `max`), `spoc` (alias `avg`), `gem`, `rmac`, `crow`.
    `embedding_dim: null` is an off-the-shelf model: no linear head, the embedding is the
    L2-normalised pooled feature (its dimension is the trunk's channel count). `scales` other
    than `[1.0]` averages the embeddings of the images resized by each factor, in eval mode only
    (retrieval); training always embeds at `dataset.image_size`.
    `fusion_layers` concatenates the L2-normalised pooled features of named layers
    (`layer3`, `layer4` for ResNets; `features.<i>` for VGG and other `features` trunks).
    `stem`: `imagenet` keeps the backbone's own first layers (a 7x7 stride-2 convolution and a
    max-pool: 32x downsampling, so a 32 px image leaves a 1x1 last feature map); `small` is the
    CIFAR ResNet stem for inputs of 64 px or less (a 3x3 stride-1 first convolution, no
    max-pool: 8x downsampling, 4x4 at 32 px), for the ResNet, ResNeXt, Wide ResNet and DenseNet
    families; with pretrained `weights` its first convolution is freshly initialised. `auto` is
    resolved by the job: `small` when the backbone has that stem and every image the job trains
    on is at most 64 px (`dataset.image_size`, and each task's), else `imagenet`; the resolved
    value is what a model package stores. The default is `imagenet`: on the digits demo (32 px)
    `small` did not score better and trained about 10x slower (docs/getting-started.md, "The demo's figures").
    """

    backbone: str = "resnet18"
    weights: str | None = Field(
        None, description="torchvision weights name (e.g. 'DEFAULT', 'IMAGENET1K_V1'); None = random init"
    )
    pooling: Literal["gem", "mac", "spoc", "rmac", "crow", "avg", "max"] = "gem"
    gem_p: float = Field(3.0, gt=0.0)
    spoc_center_prior: bool = False
    rmac_levels: int = Field(3, ge=1, le=8)
    embedding_dim: int | None = Field(128, ge=2, le=8192)
    scales: list[Annotated[float, Field(gt=0.0, le=4.0)]] = Field(default_factory=lambda: [1.0], min_length=1)
    fusion_layers: list[str] | None = Field(None, min_length=1)
    stem: StemName = Field(
        "imagenet", description="'imagenet', 'small' (3x3 stride-1 first convolution, no max-pool; <= 64 px), or 'auto'"
    )

    @field_validator("fusion_layers")
    @classmethod
    def _fusion_layers_are_unique(cls, layers: list[str] | None) -> list[str] | None:
        if layers is not None and len(set(layers)) != len(layers):
            raise ValueError(f"fusion_layers must name each layer once, got {layers}")
        return layers

    @model_validator(mode="after")
    def _small_stem_needs_an_imagenet_stem(self) -> ModelSpec:
        if self.stem == "small" and not small_stem_supported(self.backbone):
            raise ValueError(
                f"stem 'small' is not available for backbone {self.backbone!r}: it replaces the 7x7 stride-2 "
                f"convolution and max-pool of the {', '.join(SMALL_STEM_FAMILIES)} families (e.g. resnet18); "
                f"use stem 'imagenet' with {self.backbone!r}"
            )
        return self

    def resolved_stem(self, image_sizes: Sequence[int]) -> Literal["imagenet", "small"]:
        """The stem `auto` stands for with images of these sizes (`small` and `imagenet` stay as they are)."""
        if self.stem != "auto":
            return self.stem
        small_images = bool(image_sizes) and max(image_sizes) <= SMALL_STEM_MAX_IMAGE_SIZE
        return "small" if small_images and small_stem_supported(self.backbone) else "imagenet"

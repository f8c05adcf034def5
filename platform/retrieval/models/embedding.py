"""The retrieval network: backbone -> pooling -> (linear embedding) -> L2 normalisation."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from retrieval.config import ModelSpec, StemName
from retrieval.models.backbones import build_backbone
from retrieval.models.fusion import build_layer_fusion
from retrieval.models.multiscale import multiscale_embed
from retrieval.models.pooling import build_pooling


class EmbeddingNetwork(nn.Module):
    """Maps images `[B, 3, H, W]` to L2-normalised embeddings `[B, D]`.

    Three variants, chosen by the arguments:

    - plain: `trunk` (feature map `[B, C, h, w]`) -> `pool` (`[B, C]`) -> `head` -> L2 norm;
    - off-the-shelf (`embedding_dim=None`): no head, the embedding is the L2-normalised pooled
      feature and `embedding_dim` is `C`;
    - layer fusion (`fusion_layers`): `trunk` returns the concatenated, per-layer L2-normalised
      pooled features of those layers (`[B, sum_l C_l]`, see `models.fusion.LayerFusion`) and
      `pool` is the identity.

    Multi-scale extraction: with `scales` other than `(1.0,)`, the network in eval mode
    embeds the images resized to each scale and returns the L2-normalised mean
    (`models.multiscale.multiscale_embed`); in training mode it always embeds at the given size,
    so the training cost and the gradients do not change.

    Args:
        backbone: torchvision model name.
        weights: torchvision weights name, or None for random initialisation.
        pooling: `gem`, `mac`, `spoc`, `rmac`, `crow` (or the aliases `max`, `avg`).
        gem_p: initial GeM exponent.
        embedding_dim: D of the linear head, or None for no head.
        spoc_center_prior: SPoC weighs positions by a Gaussian centre prior.
        rmac_levels: R-MAC region scales.
        scales: image scales averaged in eval mode; `(1.0,)` is single-scale.
        fusion_layers: layers to pool and concatenate (`layer3`, `layer4`; `features.23`), or
            None to pool the last feature map only.
        stem: `imagenet` or `small` (see `models.backbones.apply_stem`).
    """

    def __init__(
        self,
        *,
        backbone: str,
        weights: str | None,
        pooling: str,
        gem_p: float,
        embedding_dim: int | None,
        spoc_center_prior: bool = False,
        rmac_levels: int = 3,
        scales: Sequence[float] = (1.0,),
        fusion_layers: Sequence[str] | None = None,
        stem: StemName = "imagenet",
    ) -> None:
        super().__init__()
        if len(scales) == 0 or any(scale <= 0 for scale in scales):
            raise ValueError(f"scales must be one or more positive factors, got {list(scales)}")
        make_pooling = partial(
            build_pooling, name=pooling, gem_p=gem_p, spoc_center_prior=spoc_center_prior, rmac_levels=rmac_levels
        )
        self.trunk: nn.Module
        self.pool: nn.Module
        if fusion_layers is None:
            self.trunk, channels = build_backbone(name=backbone, weights=weights, stem=stem)
            self.pool = make_pooling()
        else:
            self.trunk, channels = build_layer_fusion(
                backbone=backbone, weights=weights, layers=fusion_layers, make_pooling=make_pooling, stem=stem
            )
            self.pool = nn.Identity()
        self.head: nn.Module = nn.Identity() if embedding_dim is None else nn.Linear(channels, embedding_dim)
        self.embedding_dim = channels if embedding_dim is None else embedding_dim
        self.scales = tuple(float(scale) for scale in scales)

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> EmbeddingNetwork:
        return cls(
            backbone=spec.backbone,
            weights=spec.weights,
            pooling=spec.pooling,
            gem_p=spec.gem_p,
            embedding_dim=spec.embedding_dim,
            spoc_center_prior=spec.spoc_center_prior,
            rmac_levels=spec.rmac_levels,
            scales=spec.scales,
            fusion_layers=spec.fusion_layers,
            stem=spec.stem,
        )

    def embed_single_scale(self, images: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` -> `[B, D]`, unit norm, at the images' own size."""
        return F.normalize(self.head(self.pool(self.trunk(images))), dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` -> `[B, D]`, unit norm; multi-scale in eval mode unless `scales` is `(1.0,)`."""
        if self.training or self.scales == (1.0,):
            return self.embed_single_scale(images)
        return multiscale_embed(self.embed_single_scale, images, scales=self.scales)

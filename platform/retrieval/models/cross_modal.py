"""Image and text encoders into one common space, with optional hash layers (thesis ch. 3-4).

Ch. 3 (hashing): image: backbone -> pooling -> FC -> real feature `f_I` `[B, D]` -> FC -> tanh ->
relaxed code `h_I` `[B, K]`; text: encoder -> FC -> `f_T` -> FC -> tanh -> `h_T`.

Ch. 4 (real-valued): image and text each go through a projection MLP (Linear -> ReLU -> Linear)
into the common `D`-dim space and are L2-normalised; no codes.

The discriminator (modality classifiers) is a separate module with its own optimiser.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from retrieval.config import StemName
from retrieval.models.backbones import build_backbone
from retrieval.models.pooling import build_pooling
from retrieval.models.text import TextEncoder


class ModalityClassifier(nn.Module):
    """The modality discriminator: MLP `input_dim -> hidden_dim -> 2` with ReLU; class 0 image, 1 text.

    Args:
        input_dim: width of the features or codes it reads.
        hidden_dim: hidden layer (METHODS.md: 2K on K-bit codes, D/2 on D-dim features).
    """

    def __init__(self, *, input_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(input_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits `[N, 2]` of features `[N, input_dim]`."""
        return self.layers(x)


@dataclass
class CrossModalOutput:
    """What the network gives for a batch of images and their texts.

    Attributes:
        image_features: `[B, D]`.
        text_features: `[T, D]`.
        image_codes: `[B, K]` relaxed codes in (-1, 1), or None (real-valued model).
        text_codes: `[T, K]` or None.
        label_logits: `[B + T, C]` (images first) of the optional label classifier, or None.
        image_projections: `[B, D]` the image features before L2 normalisation (ch. 4's projection
            matching reads them: unit vectors would bound its logits to [-1, 1]); else the features.
        text_projections: `[T, D]` likewise.
    """

    image_features: torch.Tensor
    text_features: torch.Tensor
    image_codes: torch.Tensor | None
    text_codes: torch.Tensor | None
    label_logits: torch.Tensor | None = None
    image_projections: torch.Tensor | None = None
    text_projections: torch.Tensor | None = None


class CrossModalNetwork(nn.Module):
    """Two encoders into a common space; `forward` runs both so DDP sees one call.

    Args:
        backbone, weights, pooling, gem_p, stem: the image trunk (see `models.backbones`, `models.pooling`).
        text_encoder: the text side, its `output_dim` the text feature size before the head.
        common_dim: `D`.
        bits: `K` for a hashing network, None for a real-valued one.
        normalize: L2-normalise the common-space features (ch. 4); ch. 3's real features are the FC's output.
        num_labels: adds a linear label classifier on the common space (ch. 4's `L_cls`).
    """

    def __init__(
        self,
        *,
        backbone: str,
        weights: str | None,
        pooling: str,
        gem_p: float,
        text_encoder: TextEncoder,
        common_dim: int,
        bits: int | None,
        normalize: bool,
        num_labels: int | None = None,
        stem: StemName = "imagenet",
    ) -> None:
        super().__init__()
        self.trunk, channels = build_backbone(name=backbone, weights=weights, stem=stem)
        self.pool = build_pooling(name=pooling, gem_p=gem_p)
        self.text = text_encoder
        self.normalize = normalize
        self.common_dim = common_dim
        self.bits = bits
        if normalize:
            self.image_head: nn.Module = nn.Sequential(
                nn.Linear(channels, common_dim), nn.ReLU(), nn.Linear(common_dim, common_dim)
            )
            self.text_head: nn.Module = nn.Sequential(
                nn.Linear(text_encoder.output_dim, common_dim), nn.ReLU(), nn.Linear(common_dim, common_dim)
            )
        else:
            self.image_head = nn.Linear(channels, common_dim)
            self.text_head = nn.Linear(text_encoder.output_dim, common_dim)
        self.image_hash: nn.Module | None = None if bits is None else nn.Linear(common_dim, bits)
        self.text_hash: nn.Module | None = None if bits is None else nn.Linear(common_dim, bits)
        self.label_head: nn.Module | None = None if num_labels is None else nn.Linear(common_dim, num_labels)

    def _finish(self, raw: torch.Tensor) -> torch.Tensor:
        return F.normalize(raw, dim=-1) if self.normalize else raw

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` -> common-space features `[B, D]`."""
        return self._finish(self.image_head(self.pool(self.trunk(images))))

    def text_features(self, text_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Prepared text inputs (see `TextEncoder.prepare`) -> common-space features `[T, D]`."""
        return self._finish(self.text_head(self.text(text_inputs)))

    def image_codes(self, features: torch.Tensor) -> torch.Tensor:
        """Relaxed codes `[B, K]` in (-1, 1) of image features."""
        if self.image_hash is None:
            raise TypeError("this network is real-valued and has no hash layers")
        return torch.tanh(self.image_hash(features))

    def text_codes(self, features: torch.Tensor) -> torch.Tensor:
        """Relaxed codes `[T, K]` in (-1, 1) of text features."""
        if self.text_hash is None:
            raise TypeError("this network is real-valued and has no hash layers")
        return torch.tanh(self.text_hash(features))

    def forward(self, images: torch.Tensor, text_inputs: dict[str, torch.Tensor]) -> CrossModalOutput:
        image_projections = self.image_head(self.pool(self.trunk(images)))
        text_projections = self.text_head(self.text(text_inputs))
        image_features, text_features = self._finish(image_projections), self._finish(text_projections)
        hashing = self.bits is not None
        label_logits = None
        if self.label_head is not None:
            label_logits = self.label_head(torch.cat([image_features, text_features]))
        return CrossModalOutput(
            image_features=image_features,
            text_features=text_features,
            image_codes=self.image_codes(image_features) if hashing else None,
            text_codes=self.text_codes(text_features) if hashing else None,
            label_logits=label_logits,
            image_projections=image_projections,
            text_projections=text_projections,
        )


class ModalityDiscriminator(nn.Module):
    """The modality classifiers: one on the common-space features, one on the codes (hashing only).

    Args:
        feature_dim: `D`; its classifier is D -> D/2 -> 2.
        bits: `K` (classifier K -> 2K -> 2), or None for no code classifier.
    """

    def __init__(self, *, feature_dim: int, bits: int | None) -> None:
        super().__init__()
        self.features = ModalityClassifier(input_dim=feature_dim, hidden_dim=max(feature_dim // 2, 2))
        self.codes: nn.Module | None = None if bits is None else ModalityClassifier(input_dim=bits, hidden_dim=2 * bits)

    def forward(
        self, features: torch.Tensor, codes: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Modality logits `[N, 2]` of features `[N, D]` and of codes `[N, K]` (None without codes)."""
        feature_logits = self.features(features)
        if self.codes is None or codes is None:
            return feature_logits, None
        return feature_logits, self.codes(codes)

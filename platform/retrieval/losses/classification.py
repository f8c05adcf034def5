"""Classification losses on an embedding (thesis ch. 2): a learnt weight vector per class.

The normalised-softmax and ArcFace losses are pytorch-metric-learning's; this module only
picks and configures one, and returns it as a named term. Unlike a pair loss, these hold
parameters (the class weights `W`), so the module belongs inside the trained model.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from torch import nn

ClassificationHead = Literal["softmax", "normalized_softmax", "arcface"]


class SoftmaxCrossEntropy(nn.Module):
    """Cross-entropy of a linear layer's logits: the plain softmax classifier on an embedding.

    Args:
        num_classes: C.
        embedding_dim: D.
    """

    def __init__(self, *, num_classes: int, embedding_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(embedding_dim, num_classes)

    def forward(self, embeddings: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of `[B, D]` embeddings against `[B]` targets in `[0, C)`."""
        return F.cross_entropy(self.linear(embeddings), targets)


class ClassificationLoss(nn.Module):
    """A class head over embeddings `[B, D]` and its cross-entropy, for `num_classes` classes.

    - `softmax`: `SoftmaxCrossEntropy`, logits of `nn.Linear(D, C)` and their mean cross-entropy.
    - `normalized_softmax`: `NormalizedSoftmaxLoss(C, D, temperature)`: cross-entropy of the
      cosines to L2-normalised class weights divided by the temperature (Zhai & Wu, BMVC 2019).
    - `arcface`: `ArcFaceLoss(C, D, margin, scale)`: additive angular margin on the target
      class's angle, then `scale` times the cosines (Deng et al., CVPR 2019, eq. 3);
      `margin` is in degrees, as pytorch-metric-learning takes it.

    Args:
        head: which head.
        num_classes: C, the number of target classes (targets lie in `[0, C)`).
        embedding_dim: D.
        temperature: normalised-softmax temperature.
        arcface_margin: ArcFace margin, degrees.
        arcface_scale: ArcFace scale s.
    """

    def __init__(
        self,
        *,
        head: ClassificationHead,
        num_classes: int,
        embedding_dim: int,
        temperature: float = 0.05,
        arcface_margin: float = 28.6,
        arcface_scale: float = 64.0,
    ) -> None:
        super().__init__()
        if num_classes < 1 or embedding_dim < 1:
            raise ValueError(
                f"a classification head needs num_classes >= 1 and embedding_dim >= 1, "
                f"got {num_classes} and {embedding_dim}"
            )
        self.head = head
        self.num_classes = num_classes
        self.criterion: nn.Module
        if head == "softmax":
            self.criterion = SoftmaxCrossEntropy(num_classes=num_classes, embedding_dim=embedding_dim)
        elif head == "normalized_softmax":
            self.criterion = pml_losses.NormalizedSoftmaxLoss(
                num_classes=num_classes, embedding_size=embedding_dim, temperature=temperature
            )
        elif head == "arcface":
            self.criterion = pml_losses.ArcFaceLoss(
                num_classes=num_classes, embedding_size=embedding_dim, margin=arcface_margin, scale=arcface_scale
            )
        else:
            raise ValueError(f"unknown classification head {head!r}; expected softmax, normalized_softmax or arcface")

    def forward(self, embeddings: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss of a batch.

        Args:
            embeddings: `[B, D]`.
            targets: `[B]` class rows in `[0, num_classes)`.

        Returns:
            `{"classification": scalar}`, the mean over the batch.
        """
        return {"classification": self.criterion(embeddings, targets)}

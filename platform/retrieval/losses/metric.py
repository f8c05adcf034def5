"""Verification-based metric losses (thesis ch. 2) from pytorch-metric-learning.

The standard losses and miners are pytorch-metric-learning's; this module only picks
and configures them from a spec, and returns the loss as a named term.
"""

from __future__ import annotations

from typing import Literal

import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from torch import nn


class MetricLoss(nn.Module):
    """A pair/triplet loss with its usual miner, on L2-normalised embeddings.

    - `triplet`: `TripletMarginLoss(margin)` on Euclidean distances, with
      `TripletMarginMiner(type_of_triplets=mining)` (Hoffer & Ailon 2015; hard mining as in
      Hermans et al. 2017).
    - `multi_similarity`: `MultiSimilarityLoss(alpha, beta, base)` on cosine similarity with
      `MultiSimilarityMiner(epsilon)` (Wang et al., CVPR 2019, eq. 12).
    - `contrastive`: `ContrastiveLoss(pos_margin, neg_margin)` on cosine similarity with a
      `PairMarginMiner` over the same margins (Hadsell et al. 2006).

    Args:
        loss: which loss.
        use_miner: whether to mine pairs/triplets in the batch first.
        triplet_margin, triplet_mining: triplet settings.
        ms_alpha, ms_beta, ms_base, ms_miner_epsilon: multi-similarity settings.
        contrastive_pos_margin, contrastive_neg_margin: contrastive settings (similarities).
    """

    def __init__(
        self,
        *,
        loss: Literal["triplet", "multi_similarity", "contrastive"],
        use_miner: bool = True,
        triplet_margin: float = 0.1,
        triplet_mining: Literal["hard", "semihard", "all"] = "hard",
        ms_alpha: float = 2.0,
        ms_beta: float = 50.0,
        ms_base: float = 0.5,
        ms_miner_epsilon: float = 0.1,
        contrastive_pos_margin: float = 1.0,
        contrastive_neg_margin: float = 0.0,
    ) -> None:
        super().__init__()
        self.miner: nn.Module | None
        if loss == "triplet":
            self.loss = pml_losses.TripletMarginLoss(margin=triplet_margin)
            self.miner = pml_miners.TripletMarginMiner(margin=triplet_margin, type_of_triplets=triplet_mining)
        elif loss == "multi_similarity":
            self.loss = pml_losses.MultiSimilarityLoss(alpha=ms_alpha, beta=ms_beta, base=ms_base)
            self.miner = pml_miners.MultiSimilarityMiner(epsilon=ms_miner_epsilon)
        elif loss == "contrastive":
            from pytorch_metric_learning.distances import CosineSimilarity

            self.loss = pml_losses.ContrastiveLoss(
                pos_margin=contrastive_pos_margin,
                neg_margin=contrastive_neg_margin,
                distance=CosineSimilarity(),
            )
            self.miner = pml_miners.PairMarginMiner(
                pos_margin=contrastive_pos_margin,
                neg_margin=contrastive_neg_margin,
                distance=CosineSimilarity(),
            )
        else:
            raise ValueError(f"unknown metric loss {loss!r}; expected triplet, multi_similarity or contrastive")
        if not use_miner:
            self.miner = None

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss of a batch.

        Args:
            embeddings: `[B, D]`, L2-normalised.
            labels: `[B]` class ids.

        Returns:
            `{"metric": scalar}`; zero (with a gradient path) when no pair or triplet is mined.
        """
        indices = self.miner(embeddings, labels) if self.miner is not None else None
        return {"metric": self.loss(embeddings, labels, indices)}

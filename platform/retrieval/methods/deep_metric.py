"""Thesis ch. 2: supervised verification-based fine-tuning of an embedding network."""

from __future__ import annotations

import torch
from torch import nn

from retrieval.config import DeepMetricSpec, JobSpec
from retrieval.losses import MetricLoss
from retrieval.methods.base import RetrievalMethod
from retrieval.models import EmbeddingNetwork


class DeepMetric(RetrievalMethod):
    """Backbone + GeM + embedding head trained with a pair/triplet loss and a miner."""

    name = "deep_metric"

    def __init__(self, spec: JobSpec) -> None:
        super().__init__(spec)
        if not isinstance(spec.method, DeepMetricSpec):
            raise TypeError(f"DeepMetric needs a deep_metric method spec, got {spec.method.name!r}")
        self.method_spec: DeepMetricSpec = spec.method

    def build_model(self) -> nn.Module:
        return EmbeddingNetwork.from_spec(self.spec.model)

    def build_loss(self) -> nn.Module:
        settings = self.method_spec
        return MetricLoss(
            loss=settings.loss,
            use_miner=settings.miner == "default",
            triplet_margin=settings.triplet_margin,
            triplet_mining=settings.triplet_mining,
            ms_alpha=settings.ms_alpha,
            ms_beta=settings.ms_beta,
            ms_base=settings.ms_base,
            ms_miner_epsilon=settings.ms_miner_epsilon,
            contrastive_pos_margin=settings.contrastive_pos_margin,
            contrastive_neg_margin=settings.contrastive_neg_margin,
        )

    def training_step(
        self, *, model: nn.Module, loss: nn.Module, images: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        terms = loss(model(images), labels)
        terms["loss"] = self.method_spec.metric_weight * terms["metric"]
        return terms

    def embed(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return model(images)

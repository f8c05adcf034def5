"""Retrieval metrics (Recall@K, MAP@R) and the exact kNN search behind them."""

from __future__ import annotations

from retrieval.evaluation.metrics import (
    Metric,
    knn_search,
    map_at_r,
    recall_at_k,
    retrieval_metrics,
)

__all__ = ["Metric", "knn_search", "map_at_r", "recall_at_k", "retrieval_metrics"]

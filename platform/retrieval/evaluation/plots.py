"""Figures people would rather see than read; returned as matplotlib figures."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure


def recall_curve_figure(results: Mapping[str, Mapping[str, float]], *, ks: Sequence[int], title: str) -> Figure:
    """Recall@K against K, one line per model (e.g. trained, untrained, raw pixels)."""
    figure, axes = plt.subplots(figsize=(5, 3.5))
    for name, metrics in results.items():
        axes.plot(
            list(ks), [metrics[f"recall@{k}"] for k in ks], marker="o", label=f"{name} (mAP@R {metrics['map@r']:.3f})"
        )
    axes.set_xscale("log", base=2)
    axes.set_xticks(list(ks), [str(k) for k in ks])
    axes.set_xlabel("K")
    axes.set_ylabel("Recall@K")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def training_curve_figure(history: Sequence[Mapping[str, float]], *, keys: Sequence[str]) -> Figure:
    """Per-epoch curves (loss, recall@1, ...) from the reported metrics history."""
    figure, axes_list = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    epochs = [row["epoch"] for row in history]
    for axes, key in zip(axes_list[0], keys, strict=True):
        axes.plot(epochs, [row.get(key, float("nan")) for row in history], marker="o")
        axes.set_xlabel("epoch")
        axes.set_title(key)
        axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure

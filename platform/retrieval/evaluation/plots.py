"""Figures people would rather see than read; returned as matplotlib figures."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np

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


def sweep_figure(values: Sequence[Mapping[str, object]], scores: Sequence[float], *, metric: str, title: str) -> Figure:
    """The sweep's metric against each swept key: one scatter panel per key, one dot per trial.

    Numeric keys get a numeric axis (log-scaled when the values span more than a factor of 100);
    other values (strings, booleans, lists) are placed as categories.
    """
    keys = sorted({key for row in values for key in row})
    figure, axes_list = plt.subplots(1, max(len(keys), 1), figsize=(3.6 * max(len(keys), 1), 3.2), squeeze=False)
    for axes, key in zip(axes_list[0], keys, strict=False):
        column = [row.get(key) for row in values]
        numeric = all(isinstance(value, int | float) and not isinstance(value, bool) for value in column)
        if numeric:
            positions = [float(value) for value in column]  # type: ignore[arg-type]
            axes.scatter(positions, scores, alpha=0.8)
            positive = [value for value in positions if value > 0]
            if len(positive) == len(positions) and max(positive) / min(positive) > 100:
                axes.set_xscale("log")
        else:
            categories = sorted({str(value) for value in column})
            axes.scatter([categories.index(str(value)) for value in column], scores, alpha=0.8)
            axes.set_xticks(range(len(categories)), categories, rotation=30, fontsize=8)
        axes.set_xlabel(key)
        axes.set_ylabel(metric)
        axes.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def variant_bar_figure(rows: Mapping[str, Mapping[str, float]], *, metric: str, title: str) -> Figure:
    """One horizontal bar per variant (or model) for one metric, best at the top."""
    ordered = sorted(rows.items(), key=lambda item: item[1].get(metric, float("-inf")))
    names = [name for name, _ in ordered]
    values = [scores.get(metric, float("nan")) for _, scores in ordered]
    figure, axes = plt.subplots(figsize=(6, 0.35 * len(names) + 1.2))
    bars = axes.barh(names, values, color="#4878a8")
    axes.bar_label(bars, labels=[f"{value:.3f}" for value in values], fontsize=7, padding=2)
    axes.set_xlabel(metric)
    axes.set_xlim(0, max([1.0, *[value for value in values if value == value]]) * 1.08)
    axes.set_title(title)
    axes.tick_params(axis="y", labelsize=8)
    figure.tight_layout()
    return figure


def task_matrix_figure(matrix: np.ndarray, *, task_names: Sequence[str], metric: str, title: str) -> Figure:
    """Heatmap of a task x task matrix (rows: after task s; columns: test of task t)."""
    figure, axes = plt.subplots(figsize=(1.2 * len(task_names) + 2.5, 0.9 * matrix.shape[0] + 1.8))
    masked = np.ma.masked_invalid(matrix)
    image = axes.imshow(masked, vmin=0.0, vmax=1.0, cmap="viridis")
    for after in range(matrix.shape[0]):
        for task in range(matrix.shape[1]):
            if not np.isnan(matrix[after, task]):
                value = matrix[after, task]
                axes.text(
                    task, after, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black"
                )
    axes.set_xticks(range(len(task_names)), [f"test {name}" for name in task_names], rotation=30, ha="right")
    axes.set_yticks(range(matrix.shape[0]), [f"after {name}" for name in task_names[: matrix.shape[0]]])
    figure.colorbar(image, ax=axes, label=metric)
    axes.set_title(title)
    figure.tight_layout()
    return figure


def task_lines_figure(matrix: np.ndarray, *, task_names: Sequence[str], metric: str, title: str) -> Figure:
    """One line per task: its `metric` after each task of the sequence, from the task it was learnt in."""
    figure, axes = plt.subplots(figsize=(6, 4))
    steps = np.arange(matrix.shape[0])
    for task, name in enumerate(task_names):
        values = matrix[:, task]
        measured = ~np.isnan(values)
        if measured.any():
            axes.plot(steps[measured], values[measured], marker="o", label=name)
    axes.set_xticks(steps, [f"after {name}" for name in task_names[: matrix.shape[0]]], rotation=30, ha="right")
    axes.set_ylabel(metric)
    axes.set_ylim(0.0, 1.02)
    axes.grid(alpha=0.3)
    axes.legend(title="test of")
    axes.set_title(title)
    figure.tight_layout()
    return figure


def image_grid_figure(
    images: np.ndarray,
    *,
    captions: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    title: str,
    columns: int = 8,
) -> Figure:
    """A grid of normalised model inputs `[N, 3, H, W]`, shown as pixels, one caption each."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    count = len(images)
    columns = max(1, min(columns, count))
    rows = max(1, -(-count // columns))
    figure, axes_grid = plt.subplots(rows, columns, figsize=(1.4 * columns, 1.6 * rows + 0.4), squeeze=False)
    pixels = images * np.asarray(std, dtype=np.float32)[None, :, None, None]
    pixels = np.clip(pixels + np.asarray(mean, dtype=np.float32)[None, :, None, None], 0.0, 1.0)
    for position, axes in enumerate(axes_grid.flat):
        axes.axis("off")
        if position < count:
            axes.imshow(pixels[position].transpose(1, 2, 0))
            axes.set_title(captions[position], fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    return figure

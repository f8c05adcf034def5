"""Figures of the cross-modal evaluation (ch. 3 and 4), returned as matplotlib figures."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

CHANCE_LABEL = "chance: maximally uncertain"


def pr_curve_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], *, title: str) -> Figure:
    """Precision against recall of Hamming-radius retrieval, one line per label (e.g. "i2t 64 bits").

    Args:
        curves: Label -> `(precision [K + 1], recall [K + 1])`, as `hamming_pr_curve` returns them;
            NaN points (radii where a value is undefined) are left out.
        title: Figure title.
    """
    figure, axes = plt.subplots(figsize=(5, 4))
    for label, (precision, recall) in curves.items():
        precision_array, recall_array = np.asarray(precision, dtype=float), np.asarray(recall, dtype=float)
        defined = ~(np.isnan(precision_array) | np.isnan(recall_array))
        axes.plot(recall_array[defined], precision_array[defined], marker=".", label=label)
    axes.set_xlabel("recall")
    axes.set_ylabel("precision")
    axes.set_xlim(0.0, 1.02)
    axes.set_ylim(0.0, 1.02)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def precision_at_n_figure(curves: Mapping[str, Mapping[int, float]], *, title: str) -> Figure:
    """Precision@N against N (items retrieved from the Hamming ranking), one line per label."""
    figure, axes = plt.subplots(figsize=(5, 3.5))
    for label, precision in curves.items():
        cutoffs = sorted(precision)
        axes.plot(cutoffs, [precision[cutoff] for cutoff in cutoffs], marker="o", label=label)
    axes.set_xlabel("N (items retrieved)")
    axes.set_ylabel("precision@N")
    axes.set_ylim(0.0, 1.02)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def discriminator_accuracy_figure(history: Sequence[Mapping[str, float]], *, keys: Sequence[str], title: str) -> Figure:
    """Modality-classifier accuracy per epoch, one line per key, against the 0.5 of a classifier at chance.

    The entropy loss drives the classifier towards 0.5 (it cannot tell image from text codes). Rows
    without an "epoch" entry are numbered 1, 2, ... by position; a missing key leaves a gap.
    """
    figure, axes = plt.subplots(figsize=(5, 3.5))
    epochs = [row.get("epoch", position + 1) for position, row in enumerate(history)]
    for key in keys:
        axes.plot(epochs, [row.get(key, float("nan")) for row in history], marker="o", label=key)
    axes.axhline(0.5, color="gray", linestyle="--", label=CHANCE_LABEL)
    axes.set_xlabel("epoch")
    axes.set_ylabel("modality classifier accuracy")
    axes.set_ylim(0.0, 1.02)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def bit_length_figure(scores: Mapping[int, Mapping[str, float]], *, keys: Sequence[str], title: str) -> Figure:
    """mAP (or any score) against the code length in bits, one line per key (e.g. "i2t/map@all").

    Args:
        scores: Bits -> scores of the model trained at that length; a missing key leaves a gap.
        keys: The score keys to plot.
        title: Figure title.
    """
    bits = sorted(scores)
    figure, axes = plt.subplots(figsize=(5, 3.5))
    for key in keys:
        axes.plot(bits, [scores[length].get(key, float("nan")) for length in bits], marker="o", label=key)
    axes.set_xscale("log", base=2)
    axes.set_xticks(bits, [str(length) for length in bits])
    axes.set_xlabel("code length (bits)")
    axes.set_ylabel("mAP")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure

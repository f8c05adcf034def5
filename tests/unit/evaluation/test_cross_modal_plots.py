"""Cross-modal figures: the lines, labels and axes a reader relies on (not pixels)."""

from __future__ import annotations

from collections.abc import Iterator

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.lines import Line2D

from retrieval.evaluation.cross_modal_plots import (
    CHANCE_LABEL,
    bit_length_figure,
    discriminator_accuracy_figure,
    pr_curve_figure,
    precision_at_n_figure,
)


@pytest.fixture(autouse=True)
def _close_figures() -> Iterator[None]:
    yield
    plt.close("all")


def _xs(line: Line2D) -> list[float]:
    return np.asarray(line.get_xdata(), dtype=float).tolist()


def _ys(line: Line2D) -> list[float]:
    return np.asarray(line.get_ydata(), dtype=float).tolist()


def _legend_labels(axes: plt.Axes) -> list[str]:
    legend = axes.get_legend()
    assert legend is not None
    return [text.get_text() for text in legend.get_texts()]


def test_pr_curve_figure_plots_precision_against_recall_without_undefined_points() -> None:
    precision_64 = np.array([np.nan, 0.9, 0.7, 0.5])
    recall_64 = np.array([0.0, 0.2, 0.6, 1.0])
    curves = {"i2t 64 bits": (precision_64, recall_64), "t2i 64 bits": (np.array([0.8, 0.4]), np.array([0.3, 1.0]))}
    figure = pr_curve_figure(curves, title="MIRFlickr PR")
    axes = figure.axes[0]
    assert axes.get_title() == "MIRFlickr PR"
    assert (axes.get_xlabel(), axes.get_ylabel()) == ("recall", "precision")
    assert _legend_labels(axes) == ["i2t 64 bits", "t2i 64 bits"]
    first, second = axes.get_lines()
    assert _xs(first) == [0.2, 0.6, 1.0]
    assert _ys(first) == [0.9, 0.7, 0.5]
    assert _xs(second) == [0.3, 1.0]


def test_precision_at_n_figure_sorts_cutoffs() -> None:
    curves = {"i2t 32 bits": {100: 0.6, 1: 0.9, 10: 0.8}, "t2i 32 bits": {1: 0.7, 10: 0.65, 100: 0.5}}
    figure = precision_at_n_figure(curves, title="P@N")
    axes = figure.axes[0]
    assert axes.get_ylabel() == "precision@N"
    assert _legend_labels(axes) == ["i2t 32 bits", "t2i 32 bits"]
    first, second = axes.get_lines()
    assert _xs(first) == [1, 10, 100]
    assert _ys(first) == [0.9, 0.8, 0.6]
    assert _ys(second) == [0.7, 0.65, 0.5]


def test_discriminator_accuracy_figure_has_a_dashed_chance_line() -> None:
    history = [
        {"epoch": 1, "disc/code_acc": 0.95, "disc/feature_acc": 0.9},
        {"epoch": 2, "disc/code_acc": 0.7},
        {"epoch": 3, "disc/code_acc": 0.52, "disc/feature_acc": 0.55},
    ]
    figure = discriminator_accuracy_figure(history, keys=["disc/code_acc", "disc/feature_acc"], title="modality")
    axes = figure.axes[0]
    assert axes.get_title() == "modality"
    assert _legend_labels(axes) == ["disc/code_acc", "disc/feature_acc", CHANCE_LABEL]
    assert CHANCE_LABEL == "chance: maximally uncertain"
    code, feature, chance = axes.get_lines()
    assert _xs(code) == [1, 2, 3]
    assert _ys(code) == [0.95, 0.7, 0.52]
    assert np.isnan(_ys(feature)[1])
    assert chance.get_linestyle() == "--"
    assert set(_ys(chance)) == {0.5}


def test_discriminator_accuracy_figure_numbers_rows_without_epoch() -> None:
    figure = discriminator_accuracy_figure([{"acc": 0.8}, {"acc": 0.6}], keys=["acc"], title="t")
    assert _xs(figure.axes[0].get_lines()[0]) == [1, 2]


def test_bit_length_figure_plots_each_key_against_sorted_bits() -> None:
    scores = {
        64: {"i2t/map@all": 0.7, "t2i/map@all": 0.72},
        16: {"i2t/map@all": 0.6, "t2i/map@all": 0.61},
        32: {"i2t/map@all": 0.65},
    }
    figure = bit_length_figure(scores, keys=["i2t/map@all", "t2i/map@all"], title="mAP vs bits")
    axes = figure.axes[0]
    assert axes.get_xlabel() == "code length (bits)"
    assert axes.get_ylabel() == "mAP"
    assert _legend_labels(axes) == ["i2t/map@all", "t2i/map@all"]
    image_to_text, text_to_image = axes.get_lines()
    assert _xs(image_to_text) == [16, 32, 64]
    assert _ys(image_to_text) == [0.6, 0.65, 0.7]
    assert np.isnan(_ys(text_to_image)[1])
    assert [label.get_text() for label in axes.get_xticklabels()] == ["16", "32", "64"]

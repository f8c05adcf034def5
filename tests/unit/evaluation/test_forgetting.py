"""The task x task matrix and forgetting, against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from retrieval.evaluation.forgetting import as_matrix, forgetting, format_matrix, mean_forgetting


def three_task_matrix() -> np.ndarray:
    # After task 0: 0.9 on task 0. After task 1: task 0 fell to 0.6. After task 2: task 0 at 0.5, task 1 at 0.7.
    return as_matrix([{0: 0.9}, {0: 0.6, 1: 0.8}, {0: 0.5, 1: 0.7, 2: 0.95}], num_tasks=3)


def test_rows_fill_the_lower_triangle_and_leave_the_future_unmeasured() -> None:
    matrix = three_task_matrix()
    assert matrix.shape == (3, 3)
    assert math.isnan(matrix[0, 1]) and math.isnan(matrix[1, 2])
    assert matrix[2].tolist() == [0.5, 0.7, 0.95]


def test_forgetting_is_what_each_old_task_lost_since_it_was_learnt() -> None:
    matrix = three_task_matrix()
    assert forgetting(matrix, after=0) == {}
    assert forgetting(matrix, after=1) == pytest.approx({0: 0.3})
    assert forgetting(matrix, after=2) == pytest.approx({0: 0.4, 1: 0.1})
    assert mean_forgetting(matrix, after=0) is None
    assert mean_forgetting(matrix, after=2) == pytest.approx(0.25)


def test_a_task_that_improved_has_negative_forgetting() -> None:
    matrix = as_matrix([{0: 0.5}, {0: 0.7, 1: 0.9}], num_tasks=2)
    assert forgetting(matrix, after=1) == pytest.approx({0: -0.2})


def test_bad_rows_are_refused() -> None:
    with pytest.raises(ValueError, match=r"row 0 names task 3, outside 0\.\.1"):
        as_matrix([{3: 0.1}], num_tasks=2)
    with pytest.raises(ValueError, match="after=5 is outside the 3 rows"):
        forgetting(three_task_matrix(), after=5)
    gap = as_matrix([{0: 0.9}, {1: 0.8}], num_tasks=2)
    with pytest.raises(ValueError, match="task 0 was not measured"):
        forgetting(gap, after=1)


def test_the_printed_table_has_one_row_per_task_and_the_mean_forgetting() -> None:
    text = format_matrix(three_task_matrix(), task_names=["a", "b", "c"], metric="recall@1")
    lines = text.splitlines()
    assert lines[0].split() == ["recall@1:", "after", "\\", "test", "a", "b", "c", "mean", "forgetting"]
    assert lines[3].split() == ["after", "c", "0.5000", "0.7000", "0.9500", "+0.2500"]
    markdown = format_matrix(three_task_matrix(), task_names=["a", "b", "c"], metric="recall@1", markdown=True)
    assert markdown.splitlines()[2] == "| after a | 0.9000 |  |  |  |"

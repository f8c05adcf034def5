"""The task x task results of an incremental sequence, and forgetting.

`matrix[s][t]` is a metric (e.g. Recall@1) on the test split of task t, measured right
after task s was learnt (t <= s). The forgetting of task t after task s > t is
`matrix[t][t] - matrix[s][t]` (thesis ch. 5): how much of what was learnt on task t is lost.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

TaskMatrix = Sequence[Sequence[float]]


def as_matrix(rows: Sequence[Mapping[int, float]], *, num_tasks: int) -> np.ndarray:
    """A `[S, T]` float array from rows `{task: value}` (missing cells are NaN)."""
    matrix = np.full((len(rows), num_tasks), np.nan)
    for after, row in enumerate(rows):
        for task, value in row.items():
            if not 0 <= task < num_tasks:
                raise ValueError(f"row {after} names task {task}, outside 0..{num_tasks - 1}")
            matrix[after, task] = value
    return matrix


def forgetting(matrix: np.ndarray, *, after: int) -> dict[int, float]:
    """Forgetting of every task t < `after`, once task `after` is learnt: `m[t, t] - m[after, t]`.

    Args:
        matrix: `[S, T]`, rows after each task, NaN where not measured.
        after: the row (a task index) to measure at.

    Raises:
        ValueError: `after` is outside the matrix, or a needed cell is NaN.
    """
    if not 0 <= after < matrix.shape[0]:
        raise ValueError(f"after={after} is outside the {matrix.shape[0]} rows of the matrix")
    result = {}
    for task in range(after):
        learnt, now = matrix[task, task], matrix[after, task]
        if math.isnan(learnt) or math.isnan(now):
            raise ValueError(f"task {task} was not measured after task {task} and after task {after}")
        result[task] = float(learnt - now)
    return result


def mean_forgetting(matrix: np.ndarray, *, after: int) -> float | None:
    """The mean forgetting over the old tasks after task `after` (None after the first task)."""
    values = forgetting(matrix, after=after)
    return float(np.mean(list(values.values()))) if values else None


def format_matrix(matrix: np.ndarray, *, task_names: Sequence[str], metric: str, markdown: bool = False) -> str:
    """The matrix as a table: one row per 'after task s', one column per 'test of task t'.

    A last column gives the mean forgetting of the old tasks at that row.
    """
    header = [f"{metric}: after \\ test", *task_names, "mean forgetting"]
    rows = []
    for after in range(matrix.shape[0]):
        cells = [f"after {task_names[after]}"]
        cells += ["" if math.isnan(value) else f"{value:.4f}" for value in matrix[after]]
        mean = mean_forgetting(matrix, after=after)
        cells.append("" if mean is None else f"{mean:+.4f}")
        rows.append(cells)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cells) + " |" for cells in rows]
        return "\n".join(lines)
    widths = [max(len(line[column]) for line in [header, *rows]) for column in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in [header, *rows]
    )

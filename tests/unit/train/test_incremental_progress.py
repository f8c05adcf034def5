"""The incremental runner's saved progress: what a restarted job continues from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from retrieval.config import JobSpec
from retrieval.errors import ConfigError
from retrieval.losses.feature_estimation import BackwardMap
from retrieval.methods.incremental import TaskCarry
from retrieval.train.incremental import IncrementalOutcome, ProgressStore, TaskOutcome


def spec(tmp_path: Path) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "progress",
            "method": {"name": "feature_estimation"},
            "storage": {"path": str(tmp_path / "ray_results")},
            "incremental": {"tasks": [{"classes": "0-4"}, {"classes": "5-9"}]},
        }
    )


def test_nothing_saved_means_start_from_the_first_task(tmp_path: Path) -> None:
    assert ProgressStore(spec(tmp_path)).load() == ([], None)


def test_finished_tasks_and_their_carry_round_trip(tmp_path: Path) -> None:
    store = ProgressStore(spec(tmp_path))
    outcome = IncrementalOutcome(job="progress", method="feature_estimation", task_names=["task0", "task1"])
    outcome.tasks.append(
        TaskOutcome(
            task=0,
            name="task0",
            scores={0: {"recall@1": 0.9, "map@r": 0.5}},
            model={"name": "m", "version": "1"},
            promoted=True,
            index_version="v1",
        )
    )
    carry = TaskCarry(
        task=1,
        classes=(),
        previous_state={"weight": torch.arange(4.0)},
        drift={1: BackwardMap(scale=np.ones(3), shift=np.zeros(3), residual_std=np.ones(3))},
    )
    store.save(outcome, carry)

    finished, loaded = store.load()
    assert [item.to_json() for item in finished] == [outcome.tasks[0].to_json()]
    assert loaded is not None and loaded.task == 1
    assert torch.equal(loaded.previous_state["weight"], torch.arange(4.0))  # type: ignore[index]
    assert loaded.drift[1].residual_std.tolist() == [1.0, 1.0, 1.0]
    summary = store.read_summary()
    assert summary is not None and summary["recall@1_matrix"] == [[0.9, None]]
    # Nothing half-written is left beside the files.
    folder = tmp_path / "ray_results" / "progress" / "incremental"
    assert sorted(path.name for path in folder.iterdir()) == ["carry-after-task0.pt", "state.json"]


def test_a_state_without_its_carry_is_reported(tmp_path: Path) -> None:
    store = ProgressStore(spec(tmp_path))
    outcome = IncrementalOutcome(job="progress", method="feature_estimation", task_names=["task0", "task1"])
    outcome.tasks.append(TaskOutcome(task=0, name="task0", scores={0: {"recall@1": 0.9}}, model={}, promoted=False))
    store.save(outcome, TaskCarry(task=1, classes=()))
    (tmp_path / "ray_results" / "progress" / "incremental" / "carry-after-task0.pt").unlink()
    with pytest.raises(ConfigError, match="carry file is missing"):
        store.load()

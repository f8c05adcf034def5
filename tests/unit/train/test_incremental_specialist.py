"""Ch. 7's specialist (the new teacher, trained on the new task alone) is scored and logged beside the student."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from retrieval.config import JobSpec
from retrieval.data.tasks import build_task_sequence
from retrieval.methods import build_method
from retrieval.methods.incremental import IncrementalMethod, network
from retrieval.tracking.runs import TrainingRun
from retrieval.train.incremental import IncrementalOutcome, TaskOutcome, _evaluate, _log_matrices


def _recall_at_1(embeddings: np.ndarray, labels: np.ndarray) -> float:
    """Plain loop: does each test image's nearest other image (cosine) share its class?"""
    hits = 0
    for query in range(len(embeddings)):
        best, best_score = -1, -np.inf
        for other in range(len(embeddings)):
            score = float(embeddings[query] @ embeddings[other])
            if other != query and score > best_score:
                best, best_score = other, score
        hits += int(labels[best] == labels[query])
    return hits / len(embeddings)


def test_the_specialist_is_scored_on_the_new_task_and_logged_beside_the_student(tmp_path: Path) -> None:
    spec = JobSpec.model_validate(
        {
            "name": "specialist",
            "method": {"name": "dual_distillation"},
            "dataset": {"name": "digits", "image_size": 16},
            "model": {"backbone": "resnet18", "embedding_dim": 16},
            "incremental": {"tasks": [{"classes": "0-2"}, {"classes": "3-5"}], "test_fraction": 0.3},
            "evaluation": {"recall_ks": [1, 2]},
        }
    )
    method = build_method(spec)
    assert isinstance(method, IncrementalMethod)
    tasks = build_task_sequence(dataset=spec.dataset, incremental=spec.incremental)  # type: ignore[arg-type]
    torch.manual_seed(0)
    student, specialist = method.build_model(), method.build_model()
    for model in (student, specialist):
        network(model).classifier.grow(6)
        model.eval()

    first = _evaluate(spec, method=method, model=student, tasks=tasks, task=tasks[0])
    assert first.specialist is None  # task 0 has no specialist
    second = _evaluate(spec, method=method, model=student, tasks=tasks, task=tasks[1], specialist=specialist)
    assert second.specialist is not None and set(second.specialist) == set(second.scores[1])

    with torch.no_grad():
        images = torch.stack([tasks[1].test[position][0] for position in range(len(tasks[1].test))])
        vectors = method.embed(specialist, images).numpy()
    expected = _recall_at_1(vectors, np.asarray(tasks[1].test.labels))
    assert second.specialist["recall@1"] == pytest.approx(expected, abs=1e-6)

    outcome = IncrementalOutcome(job="specialist", method="dual_distillation", task_names=["a", "b"])
    run, _ = TrainingRun.start_or_resume(
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        experiment="specialist",
        run_key="specialist",
        run_name="specialist",
        params={},
        tags={},
        artifact_location=str(tmp_path / "artifacts"),
    )
    for task_outcome in (first, second):
        outcome.tasks.append(task_outcome)
        _log_matrices(spec, outcome=outcome, run=run)

    def history(key: str) -> list[tuple[int, float]]:
        return [(point.step, point.value) for point in run.client.get_metric_history(run.run_id, key)]

    for key in ("recall_at_1", "recall_at_2", "map_at_r"):
        (step, student), *_ = history(f"task1/{key}")
        assert history(f"task1/specialist/{key}") == [(1, pytest.approx(second.specialist[key.replace("_at_", "@")]))]
        ((_, lead),) = history(f"task1/student_minus_specialist/{key}")
        assert step == 1 and lead == pytest.approx(student - second.specialist[key.replace("_at_", "@")])
    assert not history("task0/specialist/recall_at_1")
    table = (tmp_path / "artifacts" / run.run_id / "artifacts" / "incremental" / "matrix.md").read_text()
    assert "student vs specialist" in table
    # Kept in the saved progress, so a resumed job still reports it.
    assert TaskOutcome.from_json(second.to_json()).specialist == second.specialist

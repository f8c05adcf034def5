"""The incremental runner on the session's Ray cluster, with 2 Ray Train workers per task.

The first test is the whole story a user sees: task 1 (digits 0-4) is trained, registered and
indexed; a Serve app goes live on that index; the job is started again, resumes at task 2
(digits 5-9), and swaps the live app to the new version, which then finds the new digits.
The second runs the methods whose carry between tasks differs (EWC, ch. 6, ch. 7) through a
two-task sequence.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from mlflow.tracking import MlflowClient

from retrieval.cli import main as cli_main
from retrieval.config import JobSpec
from retrieval.index.manifest import read_manifest

TOKEN = "incremental-test-token"
APP_NAME = "incremental-swap-test"
ROUTE = "/incremental-test"


def spec_for(method: str, tmp_path: Path, tracking: str, tasks: list[dict[str, Any]], **extra: Any) -> JobSpec:
    settings: dict[str, Any] = {"name": method}
    if method == "dual_distillation":
        settings["synthesis"] = {"iterations": 5, "images_per_class": 2, "batch_size": 8}
    if method == "ewc":
        settings["fisher_samples"] = 32
    return JobSpec.model_validate(
        {
            "name": f"it-{method.replace('_', '-')}",
            "method": settings,
            "dataset": {"name": "digits", "image_size": 24},
            "model": {"backbone": "resnet18", "embedding_dim": 32},
            "optimizer": {"name": "adam", "lr": 0.001},
            "train": {"epochs": 1, "classes_per_batch": 5, "samples_per_class": 6, "seed": 0},
            "scaling": {"num_workers": 2},
            "storage": {"path": str(tmp_path / "ray_results")},
            "tracking": {
                "tracking_uri": tracking,
                "experiment": "incremental-test",
                "registered_model": f"it-{method.replace('_', '-')}",
                "gate": [{"metric": "recall@1", "op": ">=", "value": 0.3}],
            },
            "index": {"out": str(tmp_path / "indices"), "num_shards": 2},
            "incremental": {"tasks": tasks, **extra},
        }
    )


def test_tasks_register_index_resume_and_swap_the_live_app(
    ray_train: Any,
    serve_instance: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    http_ready: Any,
    mlflow_db: str,
) -> None:
    from ray import serve

    from retrieval.serving.app import build_app
    from retrieval.serving.deployments import delete_swap_state
    from retrieval.train.incremental import run_incremental

    tasks = [{"name": "digits0-4", "classes": "0-4"}, {"name": "digits5-9", "classes": "5-9"}]
    url = f"{serve_instance}{ROUTE}"
    spec = spec_for("incremental_kd_mmd", tmp_path, mlflow_db, tasks, serve_url=url)

    first = run_incremental(spec, stop_after_task=0)
    assert [task.name for task in first.tasks] == ["digits0-4"]
    first_version = first.tasks[0].index_version
    assert first_version is not None and first.tasks[0].promoted

    state_name = "incremental-test-swap-state"
    app = build_app(
        {"index": str(tmp_path / "indices"), "tracking_uri": spec.tracking.tracking_uri, "swap_timeout_s": 120},
        ingress_env={"RETRIEVAL_ADMIN_TOKEN": TOKEN},
        state_name=state_name,
    )
    serve.run(app, name=APP_NAME, route_prefix=ROUTE)
    try:
        assert http_ready(f"{url}/version", 90).json()["index_version"] == first_version

        monkeypatch.setenv("RETRIEVAL_ADMIN_TOKEN", TOKEN)
        outcome = run_incremental(spec)
        # The finished task was kept, not trained again.
        assert [task.name for task in outcome.tasks] == ["digits0-4", "digits5-9"]
        assert outcome.tasks[0].index_version == first_version
        second = outcome.tasks[1]
        assert second.swap is not None and second.swap.get("ok"), second.swap
        version = requests.get(f"{url}/version", timeout=10).json()
        assert version["index_version"] == second.index_version
        assert version["model"]["version"] == str(second.model["version"])

        # The live index now holds the new digits, and finds them: neighbours of a 5-9 image are 5-9 images
        # of the same digit far above chance (1 in 10).
        manifest, _ = read_manifest(tmp_path / "indices" / str(second.index_version) / "manifest.json")
        assert manifest.gallery["tasks"] == ["digits0-4", "digits5-9"]
        first_new = manifest.num_items - int(manifest.gallery["count"]) + 270
        agreements = []
        for item_id in range(first_new, first_new + 20):
            reply = requests.post(f"{url}/search/id", json={"id": item_id, "k": 5}, timeout=30)
            assert reply.status_code == 200, reply.text
            body = reply.json()
            assert body["index_version"] == second.index_version
            query_label = requests.get(f"{url}/items/{item_id}", timeout=10).json()["item"]["label"]
            agreements += [result["label"] == query_label for result in body["results"]]
        assert np.mean(agreements) > 0.5
    finally:
        serve.delete(APP_NAME)
        delete_swap_state(state_name)

    # The matrix, forgetting and plots are in the MLflow run; both versions are registered and tagged.
    matrix = outcome.matrix()
    assert matrix.shape == (2, 2) and np.isnan(matrix[0, 1]) and not np.isnan(matrix[1]).any()
    client = MlflowClient(tracking_uri=spec.tracking.tracking_uri)
    run = client.get_run(outcome.run_id)
    assert "forgetting/mean" in run.data.metrics and "task1/recall_at_1" in run.data.metrics
    history = client.get_metric_history(outcome.run_id, "student/train/mmd")
    assert [point.step for point in history] == [1]
    artifacts = {item.path for item in client.list_artifacts(outcome.run_id, "incremental")}
    assert {"incremental/matrix.md", "incremental/matrix_recall_at_1.png", "incremental/task_recall.png"} <= artifacts
    versions = client.search_model_versions(f"name='{spec.registered_model_name}'")
    assert sorted(version.tags.get("retrieval.task") for version in versions) == ["0", "1"]

    # `retrieval evaluate` prints the matrix from the saved progress.
    spec_file = tmp_path / "job.yaml"
    import yaml

    spec_file.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    summary = tmp_path / "summary.json"
    assert cli_main(["evaluate", str(spec_file), "--summary", str(summary)]) == 0
    printed = capsys.readouterr().out
    assert "after digits5-9" in printed and "mean forgetting" in printed
    saved = json.loads(summary.read_text())
    assert saved["recall@1_matrix"][1][0] == pytest.approx(matrix[1, 0])


# The methods whose carry takes a path of its own through Ray: EWC's Fisher, ch. 6's drift
# statistics, ch. 7's specialist phase and replay images. Fine-tuning, joint training and LwF carry
# only the previous model, exactly like the ch. 5 job above; they run two and three tasks in one
# process in tests/unit/methods/test_incremental.py (one Ray Train run costs ~30 s here).
METHOD_TERMS = {
    "ewc": ["ewc"],
    "feature_estimation": ["corr"],
    "dual_distillation": ["corr_old", "corr_new", "corr_replay"],
}


@pytest.mark.parametrize("method", sorted(METHOD_TERMS))
def test_each_kind_of_carry_learns_a_second_task_with_two_workers(
    method: str, ray_train: Any, tmp_path: Path, mlflow_db: str
) -> None:
    from retrieval.train.incremental import run_incremental

    spec = spec_for(method, tmp_path, mlflow_db, [{"classes": "0-2"}, {"classes": "3-5"}], index=False)
    outcome = run_incremental(spec)
    matrix = outcome.matrix()
    assert matrix.shape == (2, 2) and np.isfinite(matrix[1]).all()
    # A 3-class task: chance Recall@1 is about 1/3.
    assert matrix[1, 1] > 0.4
    client = MlflowClient(tracking_uri=spec.tracking.tracking_uri)
    for term in METHOD_TERMS[method]:
        history = client.get_metric_history(outcome.run_id, f"student/train/{term}")
        assert [point.step for point in history] == [1], term
    if method == "dual_distillation":
        assert client.get_metric_history(outcome.run_id, "specialist/train/loss")
        artifacts = {item.path for item in client.list_artifacts(outcome.run_id, "incremental")}
        assert "incremental/replay_after_task0.png" in artifacts
        # The specialist is scored on the new task beside the student.
        specialist = client.get_metric_history(outcome.run_id, "task1/specialist/recall_at_1")
        assert [point.step for point in specialist] == [1] and 0.0 <= specialist[0].value <= 1.0
        assert outcome.tasks[1].specialist is not None and outcome.tasks[0].specialist is None
    assert [task.model["version"] for task in outcome.tasks] == ["1", "2"]

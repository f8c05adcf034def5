"""The Ray Train driver on the session cluster: train, record, register, gate, resume."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from retrieval.train import run_training


def _spec(make_job_spec, tmp_path: Path, tracking: str, *, name: str, epochs: int, gate: list[str], **extra):
    return make_job_spec(
        name=name,
        train={"epochs": epochs, "classes_per_batch": 5, "samples_per_class": 8},
        scaling={"num_workers": 2},
        storage={"path": str(tmp_path / "ray_results"), "max_failures": 1},
        tracking={
            "tracking_uri": tracking,
            "experiment": "tests",
            "registered_model": name.replace("_", "-"),
            "gate": gate,
        },
        # 16 px inputs (resnet18 handles them): the checks are about bookkeeping, not recall.
        dataset={
            "name": "digits",
            "image_size": 16,
            "split": {"mode": "class_ranges", "train_classes": "0-4", "test_classes": "5-9"},
        },
        **extra,
    )


def test_train_records_registers_gates_and_resumes(ray_train, make_job_spec, tmp_path, mlflow_db):
    spec = _spec(make_job_spec, tmp_path, mlflow_db, name="driver_job", epochs=2, gate=["recall@1 >= 1.01"])
    outcome = run_training(spec)

    # Evaluation: the trained model and both baselines, every metric a fraction.
    assert set(outcome.metrics) == {"recall@1", "recall@2", "recall@4", "recall@8", "map@r"}
    assert set(outcome.baselines) == {"raw_pixels", "untrained"}
    for scores in [outcome.metrics, *outcome.baselines.values()]:
        assert all(0.0 <= value <= 1.0 for value in scores.values())
        assert scores["recall@1"] <= scores["recall@2"] <= scores["recall@4"] <= scores["recall@8"]

    # An impossible gate: registered as candidate, not promoted.
    client = MlflowClient(tracking_uri=spec.tracking.tracking_uri)
    assert (outcome.model.version, outcome.promoted) == ("1", False)
    assert str(client.get_model_version_by_alias("driver-job", "candidate").version) == "1"
    assert "champion" not in client.get_registered_model("driver-job").aliases

    # MLflow: params, one point per epoch, final test metrics, plots, the version links its run.
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "2"
    assert run.data.params["method.loss"] == "multi_similarity"
    assert [point.step for point in client.get_metric_history(outcome.run_id, "recall_at_1")] == [0, 1]
    assert run.data.metrics["test/recall_at_1"] == pytest.approx(outcome.metrics["recall@1"])
    artifacts = {item.path for item in client.list_artifacts(outcome.run_id, "evaluation")}
    assert {
        "evaluation/recall_at_k.png",
        "evaluation/results.json",
        "evaluation/table.md",
        "evaluation/recall_bars.png",
    } <= artifacts
    assert client.get_model_version("driver-job", "1").run_id == outcome.run_id

    # Started again with more epochs: resumes from the last checkpoint, trains only what is left,
    # and with a gate that holds, the new version becomes champion.
    spec = _spec(make_job_spec, tmp_path, mlflow_db, name="driver_job", epochs=3, gate=["recall@1 >= 0.0"])
    resumed = run_training(spec)
    assert resumed.epochs_run[-1] == 2
    history = client.get_metric_history(resumed.run_id, "resumed_from_epoch")
    assert [point.value for point in history] == [2.0]
    assert (resumed.model.version, resumed.promoted) == ("2", True)
    assert str(client.get_model_version_by_alias("driver-job", "champion").version) == "2"


# A worker killed mid-run (Ray Train's restart from the last checkpoint of the same run) is
# tested in tests/integration/train/test_s3_storage.py, with the checkpoints in S3: one Ray
# Train job with a fault costs ~90 s on a 2-core machine, and the restart path is the same.

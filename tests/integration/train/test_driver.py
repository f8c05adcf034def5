"""The Ray Train driver on the session cluster, set up as on a real one: train, record, register, gate, resume.

One job serves every check here: its checkpoints are objects in an S3-compatible store (moto
server on 127.0.0.1) and its MLflow is a tracking server whose artifacts are in S3 too. A worker
is killed mid-run, so Ray Train restarts the group from the last checkpoint read back from S3;
then the same job, started again with one more epoch, resumes from its last checkpoint. That is
two Ray Train runs (~25 s of start-up each) where the S3-storage, tracking-server and driver
checks used to start four.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
import torch
from mlflow import MlflowClient

from retrieval.config import JobSpec
from retrieval.tracking import load_embedder
from retrieval.train import run_training
from retrieval.train.driver import TrainingOutcome

NAME = "driver_job"
REGISTERED = "driver-job"
# 3 epochs: a restart after epoch 0, and one more epoch than the 2 checkpoints kept, so pruning shows.
EPOCHS = 3


def _spec(make_job_spec: Any, s3_endpoint: Any, tracking: str, *, epochs: int, gate: list[str]) -> JobSpec:
    spec: JobSpec = make_job_spec(
        name=NAME,
        # 16 px inputs (resnet18 handles them): the checks are about bookkeeping, not recall.
        dataset={
            "name": "digits",
            "image_size": 16,
            "split": {"mode": "class_ranges", "train_classes": "0-4", "test_classes": "5-9"},
        },
        train={"epochs": epochs, "classes_per_batch": 5, "samples_per_class": 8},
        scaling={"num_workers": 2},
        storage={
            "path": f"s3://{s3_endpoint.bucket}/ray_results",
            "endpoint_url": s3_endpoint.url,
            "max_failures": 1,
        },
        tracking={"tracking_uri": tracking, "experiment": "tests", "registered_model": REGISTERED, "gate": gate},
    )
    return spec


@dataclass(frozen=True)
class FaultedRun:
    spec: JobSpec
    outcome: TrainingOutcome
    killed: str  # what the killed worker wrote before it died
    checkpoint_keys: list[str]  # the bucket's objects under the job's storage path, right after the run
    aliases: dict[str, str]  # the registered model's aliases right after the run (the resumed run moves them)


@pytest.fixture(scope="module")
def faulted_run(
    ray_train: Any, s3_endpoint: Any, mlflow_server: str, make_job_spec: Any, tmp_path_factory: pytest.TempPathFactory
) -> FaultedRun:
    """The job with an impossible gate; rank 1 is killed in epoch 1 (once)."""
    spec = _spec(make_job_spec, s3_endpoint, mlflow_server, epochs=EPOCHS, gate=["recall@1 >= 1.01"])
    marker = tmp_path_factory.mktemp("fault") / "killed.txt"
    outcome = run_training(spec, fault={"epoch": 1, "rank": 1, "marker": str(marker)})
    listing = boto3.client("s3", endpoint_url=s3_endpoint.url).list_objects_v2(
        Bucket=s3_endpoint.bucket, Prefix=f"ray_results/{NAME}/"
    )
    aliases = MlflowClient(tracking_uri=mlflow_server).get_registered_model(REGISTERED).aliases
    return FaultedRun(
        spec=spec,
        outcome=outcome,
        killed=marker.read_text(),
        checkpoint_keys=[item["Key"] for item in listing.get("Contents", [])],
        aliases={alias: str(version) for alias, version in aliases.items()},
    )


@pytest.fixture(scope="module")
def resumed_run(faulted_run: FaultedRun, s3_endpoint: Any, mlflow_server: str, make_job_spec: Any) -> TrainingOutcome:
    """The same job started again with one more epoch and a gate that holds."""
    spec = _spec(make_job_spec, s3_endpoint, mlflow_server, epochs=EPOCHS + 1, gate=["recall@1 >= 0.0"])
    return run_training(spec)


def _client(run: FaultedRun) -> MlflowClient:
    return MlflowClient(tracking_uri=run.spec.tracking.tracking_uri)


# ------------------------------------------------------------------ evaluation, gate, MLflow run


def test_the_model_and_both_baselines_are_scored_and_every_metric_is_a_fraction(faulted_run: FaultedRun) -> None:
    outcome = faulted_run.outcome
    assert set(outcome.metrics) == {"recall@1", "recall@2", "recall@4", "recall@8", "map@r"}
    assert set(outcome.baselines) == {"raw_pixels", "untrained"}
    for scores in [outcome.metrics, *outcome.baselines.values()]:
        assert all(0.0 <= value <= 1.0 for value in scores.values())
        assert scores["recall@1"] <= scores["recall@2"] <= scores["recall@4"] <= scores["recall@8"]


def test_an_impossible_gate_registers_a_candidate_and_promotes_nothing(faulted_run: FaultedRun) -> None:
    assert (faulted_run.outcome.model.version, faulted_run.outcome.promoted) == ("1", False)
    assert faulted_run.aliases["candidate"] == "1"
    assert "champion" not in faulted_run.aliases


def test_the_run_records_params_one_point_per_epoch_test_metrics_and_plots(faulted_run: FaultedRun) -> None:
    client, outcome = _client(faulted_run), faulted_run.outcome
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == str(EPOCHS)
    assert run.data.params["method.loss"] == "multi_similarity"
    # One point per epoch, though epoch 1 was cut short by the kill and run again.
    assert [point.step for point in client.get_metric_history(outcome.run_id, "recall_at_1")] == list(range(EPOCHS))
    assert run.data.metrics["test/recall_at_1"] == pytest.approx(outcome.metrics["recall@1"])
    artifacts = {item.path for item in client.list_artifacts(outcome.run_id, "evaluation")}
    assert {
        "evaluation/recall_at_k.png",
        "evaluation/results.json",
        "evaluation/table.md",
        "evaluation/recall_bars.png",
    } <= artifacts
    assert client.get_model_version(REGISTERED, "1").run_id == outcome.run_id


# ------------------------------------------------------------------ checkpoints in S3, a killed worker


def test_a_killed_worker_restarts_the_group_from_the_checkpoint_read_back_from_s3(faulted_run: FaultedRun) -> None:
    # Epoch 0 ran once; the restarted group loaded epoch 0's checkpoint and ran epochs 1-2.
    client, outcome = _client(faulted_run), faulted_run.outcome
    assert faulted_run.killed.startswith("killed rank 1 at epoch 1")
    resumed_from = [int(point.value) for point in client.get_metric_history(outcome.run_id, "resumed_from_epoch")]
    assert resumed_from == [0, 1, 1]
    assert sorted(point.step for point in client.get_metric_history(outcome.run_id, "train/loss")) == [0, 1, 2]
    assert outcome.model.version == "1"
    assert client.get_run(outcome.run_id).info.status == "FINISHED"


def test_the_checkpoints_are_objects_in_the_bucket_and_only_the_last_two_are_kept(
    faulted_run: FaultedRun, s3_endpoint: Any
) -> None:
    keys = faulted_run.checkpoint_keys
    checkpoints = {key.split("/")[2] for key in keys if key.endswith("/state.pt")}
    assert len(checkpoints) == 2, keys  # num_to_keep=2 of 3 epochs
    assert faulted_run.outcome.checkpoint_path.startswith(f"{s3_endpoint.bucket}/ray_results/{NAME}/")


def test_credentials_come_from_the_environment_and_nothing_recorded_mentions_them(
    faulted_run: FaultedRun, s3_endpoint: Any
) -> None:
    run = _client(faulted_run).get_run(faulted_run.outcome.run_id)
    recorded = [*run.data.params.values(), *run.data.tags.values()]
    assert run.data.params["storage.endpoint_url"] == s3_endpoint.url
    secrets = (os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"])
    assert not any(secret in value for secret in secrets for value in recorded)


# ------------------------------------------------------------------ the tracking server's artifacts in S3


def test_the_model_versions_files_are_objects_in_the_bucket_behind_the_tracking_server(
    faulted_run: FaultedRun, s3_endpoint: Any
) -> None:
    keys = [
        item["Key"]
        for item in boto3.client("s3", endpoint_url=s3_endpoint.url)
        .list_objects_v2(Bucket=s3_endpoint.bucket, Prefix="mlflow/")
        .get("Contents", [])
    ]
    assert any(key.endswith("/model.pt") for key in keys), keys
    assert any(key.endswith("evaluation/recall_at_k.png") for key in keys), keys


def test_the_registered_model_loads_through_the_tracking_server_out_of_s3_and_embeds(
    faulted_run: FaultedRun, mlflow_server: str
) -> None:
    package = load_embedder(f"models:/{REGISTERED}@candidate", tracking_uri=mlflow_server)
    assert package.dim == 32 and package.embed_tensor(torch.zeros(2, 3, 16, 16)).shape == (2, 32)


# ------------------------------------------------------------------ started again


def test_started_again_with_more_epochs_it_resumes_and_a_gate_that_holds_promotes_the_new_version(
    faulted_run: FaultedRun, resumed_run: TrainingOutcome
) -> None:
    # Resumes from the last checkpoint (in S3), trains only what is left, and becomes champion.
    client = _client(faulted_run)
    assert resumed_run.epochs_run[-1] == EPOCHS
    history = client.get_metric_history(resumed_run.run_id, "resumed_from_epoch")
    assert [point.value for point in history] == [float(EPOCHS)]
    assert (resumed_run.model.version, resumed_run.promoted) == ("2", True)
    assert str(client.get_model_version_by_alias(REGISTERED, "champion").version) == "2"

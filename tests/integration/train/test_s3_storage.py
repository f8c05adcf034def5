"""Ray Train checkpoints in an S3-compatible store (moto server on 127.0.0.1), resumed after a failure."""

from __future__ import annotations

import os

import boto3
from mlflow import MlflowClient

from retrieval.train import run_training


def test_s3_checkpoints_survive_a_killed_worker_and_no_secret_is_recorded(
    ray_train, s3_endpoint, make_job_spec, tmp_path, mlflow_db
):
    spec = make_job_spec(
        name="s3_job",
        # 16 px inputs (resnet18 handles them); 3 epochs: a restart after epoch 0, and one more
        # epoch than the 2 checkpoints kept, so pruning shows.
        dataset={
            "name": "digits",
            "image_size": 16,
            "split": {"mode": "class_ranges", "train_classes": "0-4", "test_classes": "5-9"},
        },
        train={"epochs": 3, "classes_per_batch": 5, "samples_per_class": 8},
        scaling={"num_workers": 2},
        storage={
            "path": f"s3://{s3_endpoint.bucket}/ray_results",
            "endpoint_url": s3_endpoint.url,
            "max_failures": 1,
        },
        tracking={
            "tracking_uri": mlflow_db,
            "experiment": "s3",
            "registered_model": "s3-job",
        },
        evaluation={"baselines": []},
    )
    marker = tmp_path / "killed.txt"
    outcome = run_training(spec, fault={"epoch": 1, "rank": 1, "marker": str(marker)})

    # The worker group restarted from epoch 0's checkpoint, read back from S3: epoch 0 ran once,
    # the restarted group loaded epoch 0's checkpoint and ran epochs 1-2.
    assert marker.read_text().startswith("killed rank 1 at epoch 1")
    client = MlflowClient(tracking_uri=spec.tracking.tracking_uri)
    resumed_from = [int(point.value) for point in client.get_metric_history(outcome.run_id, "resumed_from_epoch")]
    assert resumed_from == [0, 1, 1]
    assert sorted(point.step for point in client.get_metric_history(outcome.run_id, "train/loss")) == [0, 1, 2]
    assert outcome.model.version == "1"
    assert client.get_run(outcome.run_id).info.status == "FINISHED"

    # The checkpoints are objects in the bucket (num_to_keep=2 of 3 epochs).
    listing = boto3.client("s3", endpoint_url=s3_endpoint.url).list_objects_v2(
        Bucket=s3_endpoint.bucket, Prefix="ray_results/s3_job/"
    )
    keys = [item["Key"] for item in listing.get("Contents", [])]
    checkpoints = {key.split("/")[2] for key in keys if key.endswith("/state.pt")}
    assert len(checkpoints) == 2, keys
    assert outcome.checkpoint_path.startswith(f"{s3_endpoint.bucket}/ray_results/s3_job/")

    # Credentials come from the environment only: nothing recorded in MLflow mentions them.
    run = client.get_run(outcome.run_id)
    recorded = [*run.data.params.values(), *run.data.tags.values()]
    assert run.data.params["storage.endpoint_url"] == s3_endpoint.url
    secrets = (os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"])
    assert not any(secret in value for secret in secrets for value in recorded)

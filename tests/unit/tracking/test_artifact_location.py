"""A job's MLflow artifacts in S3 with a database tracking store (`tracking.artifact_location`)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from retrieval.tracking.runs import TrainingRun


@pytest.fixture(scope="module")
def s3_url() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    boto3.client(
        "s3", endpoint_url=url, aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1"
    ).create_bucket(Bucket="artifacts-test")
    try:
        yield url
    finally:
        server.stop()


def test_new_experiment_keeps_its_artifacts_in_s3(s3_url: str, tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run, _ = TrainingRun.start_or_resume(
        tracking_uri=tracking,
        experiment="s3-artifacts",
        artifact_location="s3://artifacts-test/mlflow",
        run_key="k1",
        run_name="r",
        params={"a": 1},
        tags={},
    )
    note = tmp_path / "note.txt"
    note.write_text("hello")
    run.log_artifact(note, artifact_path="evaluation")
    keys = [
        item["Key"]
        for item in boto3.client("s3", endpoint_url=s3_url).list_objects_v2(Bucket="artifacts-test")["Contents"]
    ]
    assert keys == [f"mlflow/{run.run_id}/artifacts/evaluation/note.txt"]

    # An existing experiment keeps its location; asking for another one says so instead of moving it.
    other, _ = TrainingRun.start_or_resume(
        tracking_uri=tracking,
        experiment="s3-artifacts",
        artifact_location="s3://artifacts-test/elsewhere",
        run_key="k2",
        run_name="r2",
        params={},
        tags={},
    )
    assert other.experiment_id == run.experiment_id
    assert "an experiment's artifact location is fixed when it is created" in caplog.text

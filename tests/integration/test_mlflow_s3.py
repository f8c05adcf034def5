"""MLflow as on a cluster: a tracking server whose artifacts live in S3 (moto server on 127.0.0.1)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import requests
import torch
from mlflow import MlflowClient

from retrieval.tracking import load_embedder
from retrieval.train import run_training


@pytest.fixture(scope="module")
def mlflow_server(s3_endpoint, tmp_path_factory, mlflow_template_db) -> Iterator[str]:
    """`mlflow server` with a sqlite backend and `--artifacts-destination s3://...`, proxying artifacts."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    # An empty database with its migrations applied: the server does not spend ~5 s creating one.
    shutil.copyfile(mlflow_template_db, folder / "mlflow.db")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    command = [
        str(Path(sys.executable).parent / "mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
        "--artifacts-destination", f"s3://{s3_endpoint.bucket}/mlflow",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint.url}
    log = (folder / "server.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not _healthy(url):
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"mlflow server did not start; see {folder / 'server.log'}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


def _healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/health", timeout=2).ok
    except requests.RequestException:
        return False


def test_training_logs_and_registers_through_a_tracking_server_with_s3_artifacts(
    ray_train, s3_endpoint, mlflow_server, make_job_spec, tmp_path
):
    spec = make_job_spec(
        name="mlflow_s3_job",
        dataset={
            "name": "digits",
            "image_size": 16,
            "split": {"mode": "class_ranges", "train_classes": "0-4", "test_classes": "5-9"},
        },
        train={"epochs": 1, "classes_per_batch": 5, "samples_per_class": 8},
        scaling={"num_workers": 1},
        storage={"path": str(tmp_path / "ray_results")},
        tracking={"tracking_uri": mlflow_server, "experiment": "s3-artifacts", "registered_model": "s3-artifacts"},
        evaluation={"baselines": []},
    )
    outcome = run_training(spec)

    # The model version's files are objects in the bucket, behind the tracking server.
    keys = [
        item["Key"]
        for item in boto3.client("s3", endpoint_url=s3_endpoint.url)
        .list_objects_v2(Bucket=s3_endpoint.bucket, Prefix="mlflow/")
        .get("Contents", [])
    ]
    assert any(key.endswith("/model.pt") for key in keys), keys
    assert any(key.endswith("evaluation/recall_at_k.png") for key in keys), keys

    # Loading the registered model goes through the server and back out of S3, and embeds.
    package = load_embedder("models:/s3-artifacts@candidate", tracking_uri=mlflow_server)
    assert package.dim == 32 and package.embed_tensor(torch.zeros(2, 3, 16, 16)).shape == (2, 32)

    # No credential reached MLflow.
    run = MlflowClient(tracking_uri=mlflow_server).get_run(outcome.run_id)
    recorded = [*run.data.params.values(), *run.data.tags.values()]
    secrets = (os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"])
    assert not any(secret in value for secret in secrets for value in recorded)

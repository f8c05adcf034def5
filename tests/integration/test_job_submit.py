"""The README's cluster path: `ray job submit ... -- retrieval train jobs/...` against a head node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[2]


def test_ray_job_submit_trains_and_registers(ray_train, tmp_path, mlflow_db):
    tracking = mlflow_db
    summary = tmp_path / "summary.json"
    bin_dir = Path(sys.executable).parent
    command = [
        str(bin_dir / "ray"), "job", "submit",
        "--address", ray_train.dashboard_url,
        "--working-dir", str(ROOT),
        "--runtime-env", str(ROOT / "jobs" / "runtime_env.yaml"),
        "--",
        "retrieval", "train", "jobs/digits_deep_metric.yaml",
        "--set", "train.epochs=1", "--set", "scaling.num_workers=1", "--set", "dataset.image_size=16",
        "--set", f"storage.path={tmp_path / 'ray_results'}",
        "--set", f"tracking.tracking_uri={tracking}",
        "--set", "tracking.registered_model=submitted-digits",
        "--summary", str(summary),
    ]  # fmt: skip
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    finished = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    output = finished.stdout + finished.stderr
    assert finished.returncode == 0, output[-4000:]
    assert "succeeded" in output

    # The job's driver ran `retrieval train`: its table was printed and its outcome recorded.
    assert "raw_pixels" in output and "registered submitted-digits version 1" in output
    outcome = json.loads(summary.read_text())
    assert outcome["model"]["name"] == "submitted-digits" and outcome["model"]["version"] == "1"
    client = MlflowClient(tracking_uri=tracking)
    assert client.get_run(outcome["mlflow_run_id"]).data.params["scaling.num_workers"] == "1"

"""A node lost while a 2-worker training job runs on it (issue 16, the fault tier).

`retrieval train` runs as its own driver on the two-node cluster, its two workers spread over
both nodes. Once Ray Train has committed a checkpoint, the worker node is killed (SIGKILL of
its whole process group). The job must restart its worker group from that checkpoint on what
is left (the head has room for both workers), finish every epoch, and register its model.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]
EPOCHS = 5


def committed_checkpoints(storage: Path) -> int:
    """Checkpoints Ray Train has registered (its checkpoint manager's snapshot), not just uploaded."""
    snapshot = storage / "fault_train" / "checkpoint_manager_snapshot.json"
    try:
        return len(json.loads(snapshot.read_text())["checkpoint_results"])
    except (OSError, ValueError, KeyError):
        return 0


def test_losing_a_node_mid_training_resumes_from_the_last_checkpoint_and_finishes(
    two_nodes_training: Any, tmp_path: Path, poll: Any
) -> None:
    storage = tmp_path / "ray_results"
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = {
        "name": "fault_train",
        "train.epochs": EPOCHS,
        "train.samples_per_class": 8,
        "model.embedding_dim": 32,
        "dataset.augment": "false",
        "scaling.num_workers": 2,
        "scaling.placement_strategy": "SPREAD",
        "storage.path": str(storage),
        "storage.max_failures": 2,
        "tracking.tracking_uri": tracking_uri,
        "tracking.registered_model": "fault-train",
        "tracking.gate": "[]",
        "evaluation.baselines": "[]",
    }
    summary = tmp_path / "summary.json"
    command = [str(Path(sys.executable).parent / "retrieval"), "train", str(REPO / "jobs" / "digits_deep_metric.yaml")]
    for key, value in overrides.items():
        command += ["--set", f"{key}={value}"]
    command += ["--address", two_nodes_training.address, "--summary", str(summary)]
    log = tmp_path / "train.log"
    with log.open("w") as output:
        job = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        worker_node = two_nodes_training.worker_node_id()

        def a_worker_runs_on_the_worker_node() -> bool:
            return any(actor["node_id"] == worker_node for actor in two_nodes_training.actors("RayTrainWorker"))

        poll(a_worker_runs_on_the_worker_node, timeout=180, what=f"a training worker on the worker node ({log})")
        poll(lambda: committed_checkpoints(storage) > 0, timeout=300, what=f"a committed checkpoint ({log})")
        committed_before_the_kill = committed_checkpoints(storage)
        assert job.poll() is None, f"the job ended before the kill: {log.read_text()[-3000:]}"
        two_nodes_training.kill_worker()
        killed_at = time.monotonic()
        returncode = job.wait(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
        if two_nodes_training.worker is None:
            two_nodes_training.start_worker()  # the next fault test starts from two nodes again
    output = log.read_text()
    assert returncode == 0, output[-5000:]
    assert time.monotonic() - killed_at < 600

    from mlflow import MlflowClient

    run_id = json.loads(summary.read_text())["mlflow_run_id"]
    client = MlflowClient(tracking_uri=tracking_uri)
    epochs = [metric.step for metric in client.get_metric_history(run_id, "train/loss")]  # step = epoch
    starts = [int(metric.value) for metric in client.get_metric_history(run_id, "resumed_from_epoch")]
    # Every epoch ran; the worker group that finished started from a committed checkpoint, not from 0.
    assert sorted(set(epochs)) == list(range(EPOCHS)), epochs
    assert max(starts) >= committed_before_the_kill >= 1, (starts, committed_before_the_kill)
    assert max(starts) < EPOCHS
    model = json.loads(summary.read_text())["model"]
    assert (model["name"], model["version"]) == ("fault-train", "1")

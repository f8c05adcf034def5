"""`retrieval tune`: a 4-trial ASHA sweep on digits, killed midway and resumed, end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml
from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[3]
# Three epochs give ASHA two rungs (1 and 2): its stop lands before a stopped trial could finish.
EPOCHS = 3
WEIGHTS = [0.0, 0.5, 1.0, 2.0]


def _space_file(tmp_path: Path, tracking: str) -> Path:
    space = {
        "name": "digits_sweep",
        "base_job": str(ROOT / "jobs" / "digits_deep_metric.yaml"),
        "overrides": {
            "train.epochs": EPOCHS,
            # Tiny inputs and batches: what is checked is the sweep's bookkeeping, not the recall.
            "dataset.image_size": 16,
            "model.embedding_dim": 32,
            "train.samples_per_class": 8,
            "evaluation.baselines": [],
            "storage.path": str(tmp_path / "ray_results"),
            "tracking.tracking_uri": tracking,
            "tracking.experiment": "sweeps",
            "tracking.registered_model": "swept-digits",
        },
        # A grid in a fixed order with one trial at a time makes ASHA's decisions reproducible.
        "space": {"method.metric_weight": {"grid": WEIGHTS}},
        "metric": "recall@1",
        "mode": "max",
        "num_samples": 1,
        "max_concurrent_trials": 1,
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
    }
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def _command(space: Path, address: str, summary: Path) -> list[str]:
    return [str(Path(sys.executable).parent / "retrieval"), "tune", str(space), "--address", address,
            "--summary", str(summary)]  # fmt: skip


def _children(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name("sweeps")
    if experiment is None:
        return []
    return [
        run
        for run in client.search_runs([experiment.experiment_id], max_results=1000)
        if "mlflow.parentRunId" in run.data.tags
    ]


def _terminated_in_tune_state(experiment: Path) -> set[str]:
    """Trial ids Tune's own saved experiment state records as finished (what a restore reads)."""
    states = sorted(experiment.glob("experiment_state-*.json"))
    if not states:
        return set()
    trials = [json.loads(entry[0]) for entry in json.loads(states[-1].read_text())["trial_data"]]
    return {trial["trial_id"] for trial in trials if trial.get("status") == "TERMINATED"}


def test_sweep_is_tracked_registers_the_best_and_resumes_after_the_driver_dies(ray_train, tmp_path, poll, mlflow_db):
    tracking = mlflow_db
    space = _space_file(tmp_path, tracking)
    summary = tmp_path / "summary.json"
    client = MlflowClient(tracking_uri=tracking)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    available_before = ray.available_resources().get("CPU", 0.0)

    # 1. Start the sweep and kill its driver once the first trial has finished.
    log = (tmp_path / "first.log").open("w")
    driver = subprocess.Popen(
        _command(space, ray_train.address, summary), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
        start_new_session=True,
    )  # fmt: skip
    try:
        poll(
            lambda: _terminated_in_tune_state(tmp_path / "ray_results" / "digits_sweep") or driver.poll() is not None,
            timeout=600,
            what="Tune to record the first finished trial",
        )
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
        log.close()
    finished_before = _terminated_in_tune_state(tmp_path / "ray_results" / "digits_sweep")
    assert finished_before, (tmp_path / "first.log").read_text()[-3000:]
    assert not summary.exists(), "the sweep finished before the driver was killed; the resume path went untested"

    # 2. The same command again restores the experiment and runs only what is left.
    rerun = subprocess.run(
        _command(space, ray_train.address, summary), capture_output=True, text=True, env=env, cwd=tmp_path,
        timeout=900,
    )  # fmt: skip
    output = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, output[-4000:]
    assert "resuming sweep 'digits_sweep'" in output
    assert f"{len(finished_before)} finished trial(s) are kept and not run again" in output
    outcome = json.loads(summary.read_text())
    assert outcome["resumed"] is True

    # One parent run, one child run per trial: a finished trial was not started again (that
    # would have opened a second child run for its trial id).
    children = _children(client)
    trial_ids = [run.data.tags["retrieval.trial_id"] for run in children]
    assert sorted(trial_ids) == sorted({row["trial_id"] for row in outcome["trials"]}) and len(trial_ids) == 4
    parents = {run.data.tags["mlflow.parentRunId"] for run in children}
    assert parents == {outcome["mlflow_parent_run_id"]}
    parent = client.get_run(outcome["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["retrieval.kind"] == "sweep"
    assert "sweep/metric_vs_weights.png" in {item.path for item in client.list_artifacts(parent.info.run_id, "sweep")}
    assert parent.data.metrics["best/recall_at_1"] == pytest.approx(
        max(row["metric"] for row in outcome["trials"]), abs=1e-9
    )

    # Each child run has its trial's value and one recall@1 per epoch it ran.
    by_trial = {row["trial_id"]: row for row in outcome["trials"]}
    for run in children:
        row = by_trial[run.data.tags["retrieval.trial_id"]]
        assert float(run.data.params["sweep.method.metric_weight"]) == row["method.metric_weight"]
        # An epoch cut short by the killed driver runs again on resume: its step may be logged twice.
        steps = sorted({point.step for point in client.get_metric_history(run.info.run_id, "recall_at_1")})
        if row["status"] == "finished":
            assert steps == list(range(EPOCHS))
        else:
            # ASHA's stop reaches the trial after its report; the epoch already under way may finish.
            assert steps[: row["epochs"]] == list(range(row["epochs"])) and len(steps) <= EPOCHS
    assert sorted(row["method.metric_weight"] for row in outcome["trials"]) == WEIGHTS

    # ASHA stopped at least one trial after its first epoch; its run says so.
    stopped = [row for row in outcome["trials"] if row["status"] == "stopped early"]
    assert stopped and all(row["epochs"] < EPOCHS for row in stopped)
    for run in children:
        if by_trial[run.data.tags["retrieval.trial_id"]]["status"] == "stopped early":
            record = client.get_run(run.info.run_id)
            assert record.data.tags["retrieval.early_stopped"] == "true"
            # KILLED, unless its last epoch had already finished when ASHA's stop arrived.
            assert record.info.status in ("KILLED", "FINISHED")

    # The best trial's model is registered as candidate, linked to the sweep.
    best = max(outcome["trials"], key=lambda row: row["metric"])
    assert outcome["best_trial"] == best["trial_id"]
    version = client.get_model_version_by_alias("swept-digits", "candidate")
    assert str(version.version) == outcome["model"]["version"]
    assert version.tags["retrieval.sweep"] == "digits_sweep"
    assert version.tags["retrieval.sweep_run_id"] == outcome["mlflow_parent_run_id"]
    assert version.tags["retrieval.trial_id"] == best["trial_id"]
    assert "champion" not in outcome["model"]["aliases"]
    assert "stopped early" in rerun.stdout and best["trial_id"] in rerun.stdout

    # Every trial's Train workers are gone: the CPUs they held are free again.
    poll(
        lambda: ray.available_resources().get("CPU", 0.0) >= available_before,
        timeout=120,
        what="the sweep's Train workers to release their CPUs",
    )

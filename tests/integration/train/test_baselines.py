"""The ch. 2 recipes under jobs/ run end to end on digits with `--set dataset=digits`.

The ArcFace recipe runs as the README's cluster path, `ray job submit ... -- retrieval train`:
one Ray Train run for the submission's checks and the recipe's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from retrieval.cli import main
from retrieval.config import load_job_spec
from retrieval.train import run_training

ROOT = Path(__file__).resolve().parents[3]
JOBS = ROOT / "jobs"


def _digits_overrides(tmp_path: Path, tracking: str, registered: str) -> list[str]:
    """What running a CUB recipe on the bundled digits on a CPU needs (no download, small model)."""
    return [
        "dataset=digits",
        "dataset.image_size=16",
        "model.weights=null",
        "model.backbone=resnet18",
        "model.embedding_dim=64",
        "train.classes_per_batch=5",
        "train.samples_per_class=8",
        "scaling.num_workers=1",
        f"storage.path={tmp_path / 'ray_results'}",
        f"tracking.tracking_uri={tracking}",
        f"tracking.registered_model={registered}",
    ]


def test_triplet_finetuning_beats_the_same_untrained_backbone_on_held_out_images_of_its_classes(
    ray_train, tmp_path, mlflow_db
):
    # Held-out *images* of the training classes (image_fraction split): fine-tuning must help.
    # (On held-out *classes* it need not on digits; docs/methods/baselines.md reports what it does.)
    spec = load_job_spec(
        JOBS / "cub_finetune_triplet.yaml",
        [
            *_digits_overrides(tmp_path, mlflow_db, "digits-triplet"),
            "dataset.split.mode=image_fraction",
            "dataset.split.train_fraction=0.5",
            "train.epochs=3",
            "optimizer.lr=0.001",
            "evaluation.baselines=[untrained]",
        ],
    )
    outcome = run_training(spec)
    untrained = outcome.baselines["untrained"]
    assert outcome.metrics["map@r"] > untrained["map@r"] + 0.05, (outcome.metrics, untrained)
    assert outcome.metrics["recall@1"] > untrained["recall@1"], (outcome.metrics, untrained)


def _check_recipe_outcome(outcome: dict[str, Any], tracking: str, job: str, registered: str) -> None:
    """What `retrieval train JOB --summary ...` of a ch. 2 recipe on digits must have produced."""
    assert outcome["model"]["name"] == registered and "candidate" in outcome["model"]["aliases"]
    assert 0.0 < outcome["metrics"]["recall@1"] <= 1.0
    client = MlflowClient(tracking_uri=tracking)
    run = client.get_run(outcome["mlflow_run_id"])
    assert run.data.tags["retrieval.method"] == load_job_spec(JOBS / job).method.name
    # Every loss term is logged per epoch (classification: the head's term; unsupervised: the metric term).
    assert any(key.startswith("train/") for key in run.data.metrics)


def test_the_unsupervised_recipe_trains_and_registers_on_digits(ray_train, tmp_path, mlflow_db, capsys):
    job, registered = "cub_unsupervised.yaml", "digits-unsupervised"
    summary = tmp_path / "summary.json"
    overrides = [
        *_digits_overrides(tmp_path, mlflow_db, registered),
        "train.epochs=1",
        "evaluation.baselines=[]",
        "method.knn_k=3",
    ]
    arguments = ["train", str(JOBS / job), "--summary", str(summary), "--system-metrics"]
    for override in overrides:
        arguments += ["--set", override]
    assert main(arguments) == 0
    outcome = json.loads(summary.read_text())
    _check_recipe_outcome(outcome, mlflow_db, job, registered)
    # Issue 18, item 6: where to find the run, printed and in the summary; the worker's system metrics.
    link = f"run {outcome['mlflow_run_id']} (browse it with: mlflow ui --backend-store-uri {mlflow_db})"
    assert outcome["mlflow_run_link"] == link
    assert f"MLflow run: {link}" in capsys.readouterr().out.splitlines()
    system = MlflowClient(tracking_uri=mlflow_db).get_run(outcome["mlflow_run_id"]).data.metrics
    assert 0.0 <= system["system/cpu_utilization_percentage"] <= 100.0


# ------------------------------------------------------------------ the README's cluster path
# `ray job submit ... -- retrieval train jobs/...` against the head node, with the ArcFace recipe:
# one Ray Train run serves both the submission's checks and the recipe's.

SUBMITTED_JOB, SUBMITTED_MODEL = "cub_finetune_arcface.yaml", "submitted-arcface"


@dataclass(frozen=True)
class Submitted:
    returncode: int
    output: str
    summary: Path
    tracking: str


@pytest.fixture(scope="module")
def submitted(ray_train, tmp_path_factory, mlflow_template_db) -> Submitted:
    folder = tmp_path_factory.mktemp("submitted")
    shutil.copyfile(mlflow_template_db, folder / "mlflow.db")
    tracking = f"sqlite:///{folder / 'mlflow.db'}"
    summary = folder / "summary.json"
    overrides = [
        *_digits_overrides(folder, tracking, SUBMITTED_MODEL),
        "train.epochs=1",
        # The cheap baseline only: the job's printed table must show one.
        "evaluation.baselines=[raw_pixels]",
    ]
    bin_dir = Path(sys.executable).parent
    command = [
        str(bin_dir / "ray"), "job", "submit",
        "--address", ray_train.dashboard_url,
        "--working-dir", str(ROOT),
        "--runtime-env", str(ROOT / "jobs" / "runtime_env.yaml"),
        "--",
        "retrieval", "train", f"jobs/{SUBMITTED_JOB}",
        *[word for override in overrides for word in ("--set", override)],
        "--summary", str(summary),
    ]  # fmt: skip
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    finished = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    return Submitted(finished.returncode, finished.stdout + finished.stderr, summary, tracking)


def test_ray_job_submit_trains_and_registers(submitted: Submitted) -> None:
    output = submitted.output
    assert submitted.returncode == 0, output[-4000:]
    assert "succeeded" in output

    # The job's driver ran `retrieval train`: its table was printed and its outcome recorded.
    assert "raw_pixels" in output and f"registered {SUBMITTED_MODEL} version 1" in output
    outcome = json.loads(submitted.summary.read_text())
    assert outcome["model"]["name"] == SUBMITTED_MODEL and outcome["model"]["version"] == "1"
    client = MlflowClient(tracking_uri=submitted.tracking)
    assert client.get_run(outcome["mlflow_run_id"]).data.params["scaling.num_workers"] == "1"


def test_the_arcface_recipe_trains_and_registers_on_digits(submitted: Submitted) -> None:
    assert submitted.returncode == 0, submitted.output[-4000:]
    outcome = json.loads(submitted.summary.read_text())
    _check_recipe_outcome(outcome, submitted.tracking, SUBMITTED_JOB, SUBMITTED_MODEL)

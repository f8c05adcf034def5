"""The ch. 2 recipes under jobs/ run end to end on digits with `--set dataset=digits`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from retrieval.cli import main
from retrieval.config import load_job_spec
from retrieval.train import run_training

JOBS = Path(__file__).resolve().parents[3] / "jobs"


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
    # (On held-out *classes* it need not on digits; the README reports what it does.)
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


@pytest.mark.parametrize(
    ("job", "registered"),
    [("cub_finetune_arcface.yaml", "digits-arcface"), ("cub_unsupervised.yaml", "digits-unsupervised")],
)
def test_classification_and_unsupervised_recipes_train_and_register_on_digits(
    ray_train, tmp_path, mlflow_db, job, registered
):
    summary = tmp_path / "summary.json"
    overrides = [*_digits_overrides(tmp_path, mlflow_db, registered), "train.epochs=1", "evaluation.baselines=[]"]
    if job == "cub_unsupervised.yaml":
        overrides.append("method.knn_k=3")
    arguments = ["train", str(JOBS / job), "--summary", str(summary)]
    for override in overrides:
        arguments += ["--set", override]
    assert main(arguments) == 0
    outcome = json.loads(summary.read_text())
    assert outcome["model"]["name"] == registered and "candidate" in outcome["model"]["aliases"]
    assert 0.0 < outcome["metrics"]["recall@1"] <= 1.0
    client = MlflowClient(tracking_uri=mlflow_db)
    run = client.get_run(outcome["mlflow_run_id"])
    assert run.data.tags["retrieval.method"] == load_job_spec(JOBS / job).method.name
    # Every loss term is logged per epoch (classification: the head's term; unsupervised: the metric term).
    assert any(key.startswith("train/") for key in run.data.metrics)

"""`retrieval evaluate`: the evaluation-only recipes run on digits, print their table, and log to MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from retrieval.cli import main

JOBS = Path(__file__).resolve().parents[2] / "jobs"
ON_DIGITS = ["dataset=digits", "model.weights=null", "model.backbone=resnet18", "evaluation.late_fusion_backbones=[]"]


def _sets(overrides: list[str]) -> list[str]:
    return [argument for override in overrides for argument in ("--set", override)]


def test_offtheshelf_recipe_prints_and_logs_the_variant_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = tmp_path / "table.json"
    overrides = [*ON_DIGITS, "evaluation.poolings=[gem,rmac]", f"tracking.tracking_uri={tracking}"]
    code = main(["evaluate", str(JOBS / "cub_offtheshelf.yaml"), *_sets(overrides), "--summary", str(summary)])
    assert code == 0
    printed = capsys.readouterr().out
    expected_rows = [
        f"{pooling}{suffix}" for pooling in ("gem", "rmac") for suffix in ("", "+pcaw", "+pcaw+aqe", "+pcaw+alpha_qe")
    ]
    table = json.loads(summary.read_text())
    assert table["protocol"] == "class" and list(table["rows"]) == expected_rows
    lines = {line.split()[0]: line.split()[1:] for line in printed.splitlines() if line.split()}
    for row in expected_rows:
        assert float(lines[row][0]) == pytest.approx(table["rows"][row]["recall@1"], abs=5e-5)

    client = MlflowClient(tracking_uri=tracking)
    experiment = client.get_experiment_by_name("ch2-baselines")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.tags["retrieval.kind"] == "evaluation" and run.data.tags["retrieval.protocol"] == "class"
    assert run.data.metrics["gem_pcaw_aqe/recall_at_1"] == pytest.approx(table["rows"]["gem+pcaw+aqe"]["recall@1"])
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/table.md", "evaluation/results.json", "evaluation/recall_at_1.png"} <= artifacts
    markdown = Path(client.download_artifacts(run.info.run_id, "evaluation/table.md", str(tmp_path))).read_text()
    assert markdown.startswith("| variant | recall@1 | recall@2 | recall@4 | recall@8 | map@r |")


def test_landmark_recipe_runs_on_digits_with_the_dataset_override(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    overrides = [*ON_DIGITS, "evaluation.poolings=[gem]", "model.scales=[1.0,0.5]"]
    assert main(["evaluate", str(JOBS / "roxford_gem.yaml"), *_sets(overrides), "--no-track"]) == 0
    printed = capsys.readouterr().out
    assert "roxford_gem on digits (class protocol)" in printed
    assert "gem+pcaw+alpha_qe" in printed


def test_evaluate_needs_exactly_one_of_spec_or_model(capsys: pytest.CaptureFixture[str]):
    assert main(["evaluate"]) == 2
    assert "exactly one of" in capsys.readouterr().err


def test_evaluate_rejects_a_wrong_override_naming_the_key(capsys: pytest.CaptureFixture[str]):
    assert main(["evaluate", str(JOBS / "cub_offtheshelf.yaml"), "--set", "evaluation.pooling=[gem]"]) == 2
    assert "evaluation.pooling" in capsys.readouterr().err

"""The CLI's answer to bad input: one clear line on stderr, exit status 2, nothing started."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from retrieval.cli import main

JOB = Path(__file__).resolve().parents[2] / "jobs" / "digits_deep_metric.yaml"


def test_train_missing_spec_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: no such file" in capsys.readouterr().err


def test_train_unknown_key_names_file_and_key(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    spec = yaml.safe_load(JOB.read_text())
    spec["train"]["epoch"] = 3
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["train", str(path)]) == 2
    error = capsys.readouterr().err
    assert str(path) in error
    assert "train.epoch: unknown key (did you mean 'epochs'?)" in error


def test_train_bad_override(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", str(JOB), "--set", "train.epochs=many"]) == 2
    error = capsys.readouterr().err
    assert "--set train.epochs=many" in error
    assert "train.epochs" in error


def test_train_dataset_folder_that_does_not_exist(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder"
    code = main(["train", str(JOB), "--set", "dataset.name=image_folder", "--set", f"dataset.root={missing}"])
    assert code == 2
    assert str(missing) in capsys.readouterr().err


def test_train_more_classes_per_batch_than_the_split_has(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", str(JOB), "--set", "train.classes_per_batch=6"]) == 2
    assert "only 5 classes" in capsys.readouterr().err


def test_index_unknown_registered_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["index", "--model", "models:/no-such-model@champion", "--tracking-uri", tracking]) == 2
    assert "models:/no-such-model@champion: no such registered model" in capsys.readouterr().err


def test_index_malformed_model_uri_and_missing_folder(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["index", "--model", "models:/only-a-name"]) == 2
    assert "is not a model URI" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(tmp_path / "missing")]) == 2
    assert "neither a models:/ URI nor a model package folder" in capsys.readouterr().err


def test_index_from_a_local_model_package(
    model_package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "index"
    assert main(["index", "--model", str(model_package), "--out", str(out), "--shards", "3"]) == 0
    manifest = yaml.safe_load((next(out.glob("*/manifest.json"))).read_text())
    assert len(manifest["shards"]) == 3
    assert manifest["num_items"] == 896  # digits 5-9, the held-out gallery of the package's job
    assert manifest["model"]["uri"] == str(model_package.resolve())
    assert "index manifest:" in capsys.readouterr().out

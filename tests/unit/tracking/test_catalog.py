"""`retrieval models list|show` over a real sqlite registry, run links, and system metrics (issue 18, items 4 and 6).

The registry holds two versions of one model, registered the way training registers them
(`register_model_package` with score tags, run metrics under ``test/``), with the aliases
``champion`` and ``candidate``; an index built by ``retrieval index --model models:/...@champion``
is recorded on the champion.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient

from retrieval.cli import main
from retrieval.methods.package import package_digest
from retrieval.tracking.catalog import describe_model_version, list_model_versions, run_link
from retrieval.tracking.registry import PACKAGE_DIGEST_TAG, register_model_package, set_alias
from retrieval.tracking.runs import TrainingRun

pytestmark = pytest.mark.slow  # a fresh sqlite registry, two registrations and an index build: tens of seconds

MODEL = "catalog-digits"
SCORES = {1: {"recall@1": 0.5125, "map@r": 0.25}, 2: {"recall@1": 0.75, "map@r": 0.375}}


@dataclass(frozen=True)
class Registry:
    tracking: str
    runs: dict[int, str]
    experiment_id: str
    index_root: Path
    index_version: str


@pytest.fixture(scope="module")
def registry(model_package: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    cache = pytest.MonkeyPatch()
    cache.setenv("RETRIEVAL_CACHE", str(tmp_path_factory.mktemp("cache")))
    root = tmp_path_factory.mktemp("catalog")
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    # Registered as training registers it, from a folder named `package` (the registry loads
    # `artifacts/package`; MLflow keeps the folder's own name).
    package = shutil.copytree(model_package, root / "staging" / "package")
    runs = {}
    for version, scores in SCORES.items():
        run, _ = TrainingRun.start_or_resume(
            tracking_uri=tracking,
            experiment="catalog",
            artifact_location=str(root / "artifacts"),
            run_key=f"job-{version}",
            run_name=f"job-{version}",
            params={"train": {"epochs": version}},
            tags={"retrieval.method": "deep_metric"},
        )
        run.log_metrics({f"test/{key}": value for key, value in scores.items()})
        run.log_metrics({"train/loss": 1.0 / version})
        registered = register_model_package(
            package,
            tracking_uri=tracking,
            run_id=run.run_id,
            registered_model=MODEL,
            tags={
                "retrieval.job": f"job-{version}",
                **{f"test.{key}": f"{value:.6f}" for key, value in scores.items()},
            },
        )
        assert registered.version == str(version)
        run.finish()
        runs[version] = run.run_id
    set_alias(tracking_uri=tracking, name=MODEL, alias="champion", version="1")
    index_root = root / "index"
    assert main(
        ["index", "--model", f"models:/{MODEL}@champion", "--tracking-uri", tracking, "--out", str(index_root),
         "--shards", "2"]
    ) == 0  # fmt: skip
    index_version = (index_root / "CURRENT").read_text().strip()
    experiment = MlflowClient(tracking_uri=tracking).get_experiment_by_name("catalog")
    assert experiment is not None
    yield Registry(tracking, runs, experiment.experiment_id, index_root, index_version)
    cache.undo()


def test_models_list_shows_versions_aliases_scores_indices_and_runs(
    registry: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert main(["models", "list", "--tracking-uri", registry.tracking]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["MODEL", "VERSION", "ALIASES", "REGISTERED"]
    newest, oldest = out[1].split(), out[2].split()
    assert newest[:3] == [MODEL, "2", "candidate"] and oldest[:3] == [MODEL, "1", "champion"]
    assert "recall@1=0.7500" in out[1] and "map@r=0.3750" in out[1] and registry.runs[2] in out[1]
    assert "recall@1=0.5125" in out[2] and registry.index_version in out[2] and registry.runs[1] in out[2]
    assert out[3] == f"browse the runs with: mlflow ui --backend-store-uri {registry.tracking}"

    assert main(["models", "list", "--tracking-uri", registry.tracking, "--name", MODEL, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["versions"]
    assert [(row["version"], row["aliases"]) for row in listed] == [
        ("2", ["candidate"]),
        ("1", ["champion"]),
    ]
    for row in listed:
        assert row["scores"] == SCORES[int(row["version"])]
        assert row["run_id"] == registry.runs[int(row["version"])]
        assert row["run_link"] == (
            f"run {row['run_id']} (browse it with: mlflow ui --backend-store-uri {registry.tracking})"
        )
    assert listed[1]["index_versions"] == {
        registry.index_version: str(registry.index_root / registry.index_version / "manifest.json")
    }
    assert listed[0]["index_versions"] == {}


def test_models_show_gives_one_version_in_full(
    registry: Registry, model_package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert main(["models", "show", f"{MODEL}@champion", "--tracking-uri", registry.tracking, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["version"], shown["aliases"]) == ("1", ["champion"])
    assert shown["package_sha256"] == package_digest(model_package) == shown["tags"][PACKAGE_DIGEST_TAG]
    assert shown["run"]["metrics"] == {"test/map_at_r": 0.25, "test/recall_at_1": 0.5125, "train/loss": 1.0}
    assert shown["run"]["params"] == {"train.epochs": "1"}
    assert shown["run"]["tags"]["retrieval.method"] == "deep_metric"
    assert shown["run"]["experiment_id"] == registry.experiment_id
    assert shown["artifact_uri"] and shown["source"]
    assert shown["tags"]["retrieval.job"] == "job-1"

    assert main(["models", "show", MODEL, "--tracking-uri", registry.tracking]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0] == f"models:/{MODEL}/2  (@candidate)"
    assert f"package sha256   {package_digest(model_package)}" in text
    assert "run metrics:" in text and "test/recall_at_1" in text and "run params:" in text
    for reference in (f"{MODEL}/1", f"models:/{MODEL}/1"):
        assert describe_model_version(reference, tracking_uri=registry.tracking).aliases == ("champion",)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["show", "no-such-model"], f"no registered model 'no-such-model' in {{tracking}} (registered: {MODEL})"),
        (["show", f"{MODEL}/7"], f"model '{MODEL}' has no version '7' (versions: 1, 2)"),
        (["show", f"{MODEL}@prod"], f"model '{MODEL}' has no alias 'prod' (aliases: @candidate -> 2, @champion -> 1)"),
        (["show", f"{MODEL}/"], f"'{MODEL}/': expected NAME, NAME/VERSION or NAME@ALIAS"),
        (["list", "--name", "nope"], f"no registered model 'nope' in {{tracking}} (registered: {MODEL})"),
    ],
)
def test_unknown_models_versions_and_aliases_are_one_clear_line(
    registry: Registry, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    capsys.readouterr()
    assert main(["models", *argv, "--tracking-uri", registry.tracking]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {message.format(tracking=registry.tracking)}\n" and captured.out == ""


def test_an_empty_registry_lists_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tracking = f"sqlite:///{tmp_path / 'empty.db'}"
    assert list_model_versions(tracking_uri=tracking) == []
    assert main(["models", "list", "--tracking-uri", tracking]) == 0
    assert capsys.readouterr().out == f"no registered models in {tracking}\n"


def test_run_link_points_at_the_server_page_or_at_mlflow_ui() -> None:
    assert run_link("https://user:pa55@mlflow.example:5000/", run_id="abc", experiment_id="3") == (
        "https://mlflow.example:5000/#/experiments/3/runs/abc"
    )
    assert run_link("http://mlflow:5000", run_id="abc", experiment_id=None) == "http://mlflow:5000/#/runs/abc"
    link = run_link("sqlite:///relative.db", run_id="abc", experiment_id="1")
    assert link.startswith("run abc (browse it with: mlflow ui --backend-store-uri sqlite:////")
    assert link.endswith("/relative.db)")


def test_system_metrics_are_logged_to_a_run_while_the_block_runs(tmp_path: Path) -> None:
    from retrieval.tracking.system_metrics import system_metrics_logging

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run, _ = TrainingRun.start_or_resume(
        tracking_uri=tracking, experiment="sys", run_key="k", run_name="r", params={}, tags={}
    )
    with system_metrics_logging(tracking_uri=tracking, run_id=run.run_id, interval_s=1.0, node_id="node1"):
        pass  # shorter than one interval: the closing sample is still logged
    metrics = MlflowClient(tracking_uri=tracking).get_run(run.run_id).data.metrics
    assert 0.0 <= metrics["system/node1/cpu_utilization_percentage"] <= 100.0
    assert metrics["system/node1/system_memory_usage_megabytes"] > 0
    run.finish()


def test_the_system_metrics_option_needs_psutil_and_a_sane_interval(make_job_spec, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import importlib.util

    from retrieval.errors import ConfigError

    assert make_job_spec(tracking={"system_metrics": True}).tracking.system_metrics is True
    with pytest.raises(ConfigError, match=r"tracking\.system_metrics_interval_s"):
        make_job_spec(tracking={"system_metrics": True, "system_metrics_interval_s": 0.1})
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "psutil" else real_find_spec(name, *a)
    )
    with pytest.raises(ConfigError, match="need the psutil package"):
        make_job_spec(tracking={"system_metrics": True})

"""MLflow runs of training jobs: one run per job, resumed when the job is resumed."""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

logger = logging.getLogger(__name__)

RUN_KEY_TAG = "retrieval.run_key"
_UNSAFE_METRIC_CHARACTERS = re.compile(r"[^A-Za-z0-9_\-./ ]")
_SQLITE_PREFIX = "sqlite:///"


def resolve_tracking_uri(uri: str) -> str:
    """Make a relative `sqlite:///file.db` absolute, so Ray workers (other cwd) hit the same file."""
    if uri.startswith(_SQLITE_PREFIX) and not uri.startswith(_SQLITE_PREFIX + "/"):
        return _SQLITE_PREFIX + str(Path(uri[len(_SQLITE_PREFIX) :]).resolve())
    return uri


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`; lists are kept as their string form."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def code_version() -> str | None:
    """The git commit of the working tree, with `-dirty` when it has uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit


@dataclass(frozen=True)
class TrainingRun:
    """The MLflow run of one training job, addressable from any Ray worker."""

    tracking_uri: str
    run_id: str
    experiment_id: str

    @classmethod
    def start_or_resume(
        cls,
        *,
        tracking_uri: str,
        experiment: str,
        run_key: str,
        run_name: str,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        reuse_finished: bool = False,
        artifact_location: str | None = None,
    ) -> tuple[TrainingRun, bool]:
        """The unfinished run tagged `run_key`, or a new one; returns `(run, resumed)`.

        A job resumed by Ray Train (same storage path and name) keeps logging into the
        run it started, so one job is one MLflow run however often it restarts. With
        `reuse_finished`, a finished run with that key is reopened too (a sweep run again
        after it completed reports into the same parent run).
        """
        uri = resolve_tracking_uri(tracking_uri)
        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            experiment_id = client.create_experiment(experiment, artifact_location=artifact_location)
        else:
            experiment_id = found.experiment_id
            if artifact_location and found.artifact_location.rstrip("/") != artifact_location.rstrip("/"):
                logger.warning(
                    "experiment %r keeps its artifacts in %s, not %s: an experiment's artifact location "
                    "is fixed when it is created",
                    experiment,
                    found.artifact_location,
                    artifact_location,
                )
        quoted = run_key.replace("'", "\\'")
        status_filter = "" if reuse_finished else " and attributes.status != 'FINISHED'"
        unfinished = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{RUN_KEY_TAG}` = '{quoted}'{status_filter}",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        if unfinished:
            run_id = unfinished[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            logger.info("resuming MLflow run %s", run_id)
            return cls(tracking_uri=uri, run_id=run_id, experiment_id=experiment_id), True
        run = client.create_run(experiment_id, run_name=run_name, tags={RUN_KEY_TAG: run_key, **tags})
        run_id = run.info.run_id
        for key, value in flatten(params).items():
            client.log_param(run_id, key, str(value)[:6000])
        logger.info("started MLflow run %s in experiment %s", run_id, experiment)
        return cls(tracking_uri=uri, run_id=run_id, experiment_id=experiment_id), False

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.tracking_uri)

    def log_metrics(self, metrics: Mapping[str, float], *, step: int | None = None) -> None:
        client = self.client
        for key, value in metrics.items():
            client.log_metric(self.run_id, metric_key(key), float(value), step=step)

    def log_artifact(self, path: str | os.PathLike[str], *, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        self.client.log_dict(self.run_id, dict(data), artifact_file)

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def finish(self, *, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def metric_key(name: str) -> str:
    """An MLflow-safe metric or tag name: `recall@1` -> `recall_at_1`, `gem+pcaw` -> `gem_pcaw`."""
    # MLflow metric names allow letters, digits, _ - . / and space; '@' is not among them.
    return _UNSAFE_METRIC_CHARACTERS.sub("_", name.replace("@", "_at_"))

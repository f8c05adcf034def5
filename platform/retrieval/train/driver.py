"""Runs a job spec as a Ray Train job, then evaluates, records and registers the model.

Data flow (ARCHITECTURE.md): TorchTrainer with N workers -> a checkpoint per epoch in
`storage.path` -> evaluation of the final model beside baselines -> MLflow run (params,
metrics, plots) -> registered model version, alias `candidate`, promoted to `champion`
when the job's gate holds.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pyarrow.fs
import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from retrieval.config import JobSpec
from retrieval.methods import build_method, load_model_package, save_model_package
from retrieval.methods.base import Evaluation, TaskAssignment
from retrieval.methods.training import package_files_of
from retrieval.serialization import load_state
from retrieval.tracking.runs import TrainingRun, code_version
from retrieval.train.outcome import TrainingOutcome, register_package
from retrieval.train.worker import (
    CHECKPOINT_STATE,
    FaultPlan,
    RunAddress,
    WorkerConfig,
    train_loop_per_worker,
    with_system_metrics,
)

logger = logging.getLogger(__name__)


def storage_path(spec: JobSpec) -> str:
    """Ray Train storage: `s3://...` as is, a local folder made absolute (workers have another cwd)."""
    path = spec.storage.path
    return path if "://" in path else str(Path(path).resolve())


def storage_location(spec: JobSpec, path: str | None = None) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """`(storage_path, storage_filesystem)` for Ray's RunConfig.

    With `storage.endpoint_url`, an S3 filesystem on that endpoint (credentials from the
    environment of each node) and the path without its `s3://` scheme; otherwise the path as
    is and no filesystem (Ray infers it; `AWS_ENDPOINT_URL` in the environment also works).
    """
    location = path or storage_path(spec)
    endpoint = spec.storage.endpoint_url
    if endpoint is None or not location.startswith("s3://"):
        return location, None
    return location.removeprefix("s3://"), pyarrow.fs.S3FileSystem(endpoint_override=endpoint)


def check_job_inputs(spec: JobSpec) -> None:
    """Fail fast, before any Ray worker starts, on inputs that would only fail inside one (the method's `check_inputs`).

    Raises:
        DatasetError: the dataset cannot be read or split as specified, or is too small for a batch
            (too few classes for a P x K batch, or too few pairs for a batch per worker).
    """
    build_method(spec).check_inputs()


def run_training(spec: JobSpec, *, fault: FaultPlan | Mapping[str, Any] | None = None) -> TrainingOutcome:
    """Train, evaluate, log and register one job. Starting it again with the same spec resumes it.

    Args:
        spec: the validated job.
        fault: test hook, see `retrieval.train.worker._maybe_inject_fault`.
    """
    check_job_inputs(spec)
    if not ray.is_initialized():
        ray.init()
    run_key = f"{storage_path(spec)}/{spec.name}"
    run, resumed = TrainingRun.start_or_resume(
        tracking_uri=spec.tracking.uri(),
        experiment=spec.tracking.experiment,
        artifact_location=spec.tracking.artifact_location,
        run_key=run_key,
        run_name=spec.name,
        params=spec.model_dump(mode="json"),
        tags={
            "retrieval.method": spec.method.name,
            "retrieval.dataset": spec.dataset.name,
            "retrieval.code_version": code_version() or "unknown",
        },
    )
    try:
        outcome = _train_and_register(spec, run=run, fault=fault)
    except BaseException:
        run.finish(status="FAILED")
        raise
    outcome = dataclasses.replace(outcome, resumed=resumed)
    run.finish()
    return outcome


def _train_and_register(
    spec: JobSpec, *, run: TrainingRun, fault: FaultPlan | Mapping[str, Any] | None
) -> TrainingOutcome:
    with tempfile.TemporaryDirectory() as folder:
        spec_file = Path(folder) / "job.yaml"
        spec_file.write_text(_yaml(spec))
        run.log_artifact(spec_file)

    result = build_trainer(spec, run=run, fault=fault).fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training job {spec.name!r} finished without a checkpoint")
    return register_checkpoint(
        spec, checkpoint=result.checkpoint, run=run, history=_history(result), promote_with_gate=True
    )


def build_trainer(
    spec: JobSpec,
    *,
    run: TrainingRun | None,
    fault: FaultPlan | Mapping[str, Any] | None = None,
    name: str | None = None,
    storage: str | None = None,
    callbacks: Sequence[Any] = (),
    task: TaskAssignment | None = None,
    carry: Any = None,
) -> TorchTrainer:
    """The TorchTrainer of a job: one run named `name` (default the job's) under `storage`.

    Every method trains in the one worker loop (`retrieval.train.worker.train_loop_per_worker`).
    Starting a trainer again with the same name and storage resumes from its last checkpoint.
    `callbacks` go to the run config (e.g. Tune's `TuneReportCallback` inside a sweep trial).
    `task` and `carry` (a Ray object reference to the earlier tasks' carry) make it one task of an
    incremental sequence (see `retrieval.train.incremental`).
    """
    location, filesystem = storage_location(spec, storage)
    worker = WorkerConfig(
        spec=spec.model_dump(mode="json"),
        tracking=(
            RunAddress(tracking_uri=run.tracking_uri, run_id=run.run_id, experiment_id=run.experiment_id)
            if run is not None
            else None
        ),
        fault=FaultPlan(**fault) if isinstance(fault, Mapping) else fault,
        task=task,
        carry=carry,
    )
    loop: Any = train_loop_per_worker
    if spec.tracking.system_metrics and run is not None:
        loop = functools.partial(with_system_metrics, loop)
    return TorchTrainer(
        loop,
        train_loop_config=worker.to_loop_config(),
        scaling_config=ScalingConfig(
            num_workers=spec.scaling.num_workers,
            use_gpu=spec.scaling.use_gpu,
            resources_per_worker=spec.scaling.resources_per_worker,
            placement_strategy=spec.scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=name or spec.name,
            storage_path=location,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=spec.storage.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.storage.checkpoints_to_keep),
            callbacks=list(callbacks) or None,
        ),
    )


def register_checkpoint(
    spec: JobSpec,
    *,
    checkpoint: ray.train.Checkpoint,
    run: TrainingRun,
    history: Sequence[Mapping[str, Any]] = (),
    promote_with_gate: bool,
    tags: Mapping[str, str] | None = None,
) -> TrainingOutcome:
    """Evaluate a training checkpoint (the method's `evaluate_package`), log it to `run`, register it.

    The one registration path of every method. The new version gets the alias `candidate`; with
    `promote_with_gate` it also becomes `champion` when the job's gate holds.
    """
    with tempfile.TemporaryDirectory() as folder:
        with checkpoint.as_directory() as checkpoint_dir:
            state = load_state(Path(checkpoint_dir) / CHECKPOINT_STATE)
        package_dir = save_model_package(
            Path(folder) / "package", spec=spec, state_dict=state["model"], extra_files=package_files_of(state)
        )
        package = load_model_package(package_dir)
        evaluation = package.method.evaluate_package(package, history=history)
        log_evaluation(run, evaluation)
        metrics = evaluation.metrics
        registered, promoted, gate = register_package(
            spec,
            package_dir=package_dir,
            run=run,
            metrics=metrics,
            tags={
                **package.method.registration_tags(),
                **{f"test.{key}": f"{value:.6f}" for key, value in metrics.items()},
                **(tags or {}),
            },
            promote_with_gate=promote_with_gate,
        )
    return TrainingOutcome(
        metrics=metrics,
        baselines=evaluation.baselines,
        model=registered,
        promoted=promoted,
        gate=gate,
        run_id=run.run_id,
        checkpoint_path=checkpoint.path,
        epochs_run=[int(row["epoch"]) for row in history if "epoch" in row],
    )


def log_evaluation(run: TrainingRun, evaluation: Evaluation) -> None:
    """Log a registered model's scores (`test/...`, `baseline/<name>/...`), documents, texts and plots."""
    run.log_metrics({f"test/{key}": value for key, value in evaluation.metrics.items()})
    for baseline, values in evaluation.baselines.items():
        run.log_metrics({f"baseline/{baseline}/{key}": value for key, value in values.items()})
    for path, document in evaluation.documents.items():
        run.log_dict(document, path)
    for path, text in evaluation.texts.items():
        run.client.log_text(run.run_id, text, path)
    for path, figure in evaluation.figures.items():
        run.log_figure(figure, path)
        plt.close(figure)


def _history(result: ray.train.Result) -> list[dict[str, float]]:
    frame = getattr(result, "metrics_dataframe", None)
    if frame is None or frame.empty:
        return [dict(result.metrics or {})] if result.metrics else []
    return [row for row in frame.to_dict("records")]


def _yaml(spec: JobSpec) -> str:
    import yaml

    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)

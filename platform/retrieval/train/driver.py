"""Runs a job spec as a Ray Train job, then evaluates, records and registers the model.

Data flow (ARCHITECTURE.md): TorchTrainer with N workers -> a checkpoint per epoch in
`storage.path` -> evaluation of the final model beside baselines -> MLflow run (params,
metrics, plots) -> registered model version, alias `candidate`, promoted to `champion`
when the job's gate holds.
"""

from __future__ import annotations

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
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from retrieval.config import JobSpec
from retrieval.data.base import ImageDataset
from retrieval.data.from_spec import datasets_from_spec
from retrieval.errors import DatasetError
from retrieval.evaluation.plots import recall_curve_figure, training_curve_figure, variant_bar_figure
from retrieval.evaluation.runs import SEEN_CLASSES_PREFIX, embed_dataset, raw_pixel_embeddings, score_embeddings
from retrieval.evaluation.suite import format_table
from retrieval.methods import build_method, load_model_package, save_model_package
from retrieval.methods.package import ModelPackage
from retrieval.serialization import load_state
from retrieval.tracking.registry import register_model_package
from retrieval.tracking.runs import TrainingRun, code_version
from retrieval.train.outcome import TrainingOutcome, apply_gate
from retrieval.train.worker import CHECKPOINT_STATE, train_loop_per_worker, with_system_metrics

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
    """Fail fast, before any Ray worker starts, on inputs that would only fail inside one.

    Raises:
        DatasetError: the dataset cannot be read or split as specified, or its training split
            has fewer classes than a batch needs (or, for a cross-modal job, fewer pairs than a
            batch per worker).
    """
    if spec.is_cross_modal:
        from retrieval.data.cross_modal import cross_modal_datasets_from_spec
        from retrieval.train.cross_modal import method_for

        pairs = cross_modal_datasets_from_spec(spec.dataset)
        needed = 2 * spec.scaling.num_workers
        if len(pairs.train) < needed:
            raise DatasetError(
                f"the training split of {spec.dataset.name!r} has {len(pairs.train)} pairs; "
                f"{spec.scaling.num_workers} workers need at least {needed}"
            )
        # Builds the text context (and, for a BoW encoder, checks the dataset has tag vectors).
        method_for(spec, pairs.train)
        return
    splits = datasets_from_spec(spec.dataset)
    train_classes = len(set(splits.train.labels.tolist()))
    if train_classes < spec.train.classes_per_batch:
        raise DatasetError(
            f"train.classes_per_batch is {spec.train.classes_per_batch} but the training split of "
            f"{spec.dataset.name!r} has only {train_classes} classes"
        )


def run_training(spec: JobSpec, *, fault: dict[str, Any] | None = None) -> TrainingOutcome:
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
    outcome.resumed = resumed
    run.finish()
    return outcome


def _train_and_register(spec: JobSpec, *, run: TrainingRun, fault: dict[str, Any] | None) -> TrainingOutcome:
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
    fault: dict[str, Any] | None = None,
    name: str | None = None,
    storage: str | None = None,
    callbacks: Sequence[Any] = (),
    task: Mapping[str, Any] | None = None,
) -> TorchTrainer:
    """The TorchTrainer of a job: one run named `name` (default the job's) under `storage`.

    Starting a trainer again with the same name and storage resumes from its last checkpoint.
    `callbacks` go to the run config (e.g. Tune's `TuneReportCallback` inside a sweep trial).
    `task` makes it one task of an incremental sequence (see `retrieval.train.incremental`).
    """
    location, filesystem = storage_location(spec, storage)
    if spec.is_cross_modal:
        from retrieval.train.cross_modal import cross_modal_loop_per_worker

        loop: Any = cross_modal_loop_per_worker
    else:
        loop = train_loop_per_worker
    if spec.tracking.system_metrics and run is not None:
        loop = functools.partial(with_system_metrics, loop)
    return TorchTrainer(
        loop,
        train_loop_config={
            "spec": spec.model_dump(mode="json"),
            "tracking": (
                {"tracking_uri": run.tracking_uri, "run_id": run.run_id, "experiment_id": run.experiment_id}
                if run is not None
                else None
            ),
            "fault": fault,
            "task": dict(task) if task is not None else None,
        },
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
    """Evaluate a training checkpoint beside the baselines, log it to `run`, register it.

    The new version gets the alias `candidate`; with `promote_with_gate` it also becomes
    `champion` when the job's gate holds.
    """
    if spec.is_cross_modal:
        from retrieval.train.cross_modal import register_cross_modal_checkpoint

        outcome: TrainingOutcome = register_cross_modal_checkpoint(
            spec, checkpoint=checkpoint, run=run, history=history, promote_with_gate=promote_with_gate, tags=tags
        )
        return outcome
    with tempfile.TemporaryDirectory() as folder:
        with checkpoint.as_directory() as checkpoint_dir:
            state = load_state(Path(checkpoint_dir) / CHECKPOINT_STATE)
        package_dir = save_model_package(Path(folder) / "package", spec=spec, state_dict=state["model"])
        metrics, baselines = evaluate_with_baselines(spec, package_dir)

        run.log_metrics({f"test/{key}": value for key, value in metrics.items()})
        for baseline, values in baselines.items():
            run.log_metrics({f"baseline/{baseline}/{key}": value for key, value in values.items()})
        run.log_dict({"trained": metrics, **baselines}, "evaluation/results.json")
        table = {"trained": metrics, **baselines}
        columns = [f"recall@{k}" for k in spec.evaluation.recall_ks] + ["map@r"]
        run.client.log_text(
            run.run_id, format_table(table, columns, markdown=True, label="model") + "\n", "evaluation/table.md"
        )
        first = f"recall@{spec.evaluation.recall_ks[0]}"
        figure = variant_bar_figure(table, metric=first, title=f"{spec.name}: held-out {first}")
        run.log_figure(figure, "evaluation/recall_bars.png")
        plt.close(figure)
        figure = recall_curve_figure(
            {"trained": metrics, **baselines}, ks=spec.evaluation.recall_ks, title=f"{spec.name}: held-out classes"
        )
        run.log_figure(figure, "evaluation/recall_at_k.png")
        plt.close(figure)
        if history:
            figure = training_curve_figure(list(history), keys=["train/loss", "recall@1"])
            run.log_figure(figure, "training/curves.png")
            plt.close(figure)

        registered = register_model_package(
            package_dir,
            tracking_uri=run.tracking_uri,
            run_id=run.run_id,
            registered_model=spec.registered_model_name,
            aliases=("candidate",),
            tags={
                "retrieval.job": spec.name,
                **{f"test.{key}": f"{value:.6f}" for key, value in metrics.items()},
                **(tags or {}),
            },
        )

    registered, promoted, gate = apply_gate(
        spec, registered=registered, metrics=metrics, run=run, promote_with_gate=promote_with_gate
    )
    return TrainingOutcome(
        metrics=metrics,
        baselines=baselines,
        model=registered,
        promoted=promoted,
        gate=gate,
        run_id=run.run_id,
        checkpoint_path=checkpoint.path,
        epochs_run=[int(row["epoch"]) for row in history if "epoch" in row],
    )


def evaluate_with_baselines(spec: JobSpec, package_dir: Path) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Scores of the trained model and of the spec's baselines on the held-out split(s).

    Keys as `score_embeddings` names them (`recall@1`, `map@r`, ...) are the test split; when
    the split holds out images of the training classes (`dataset.split.seen_test_fraction`),
    the same scores on those images follow under `seen_classes/` (`seen_classes/recall@1`).
    """
    splits = datasets_from_spec(spec.dataset)
    package = load_model_package(package_dir)
    trained: dict[str, float] = {}
    baselines: dict[str, dict[str, float]] = {baseline: {} for baseline in spec.evaluation.baselines}
    held_out = [("", splits.test)]
    if splits.seen_test is not None:
        held_out.append((SEEN_CLASSES_PREFIX, splits.seen_test))
    for prefix, test in held_out:
        trained.update(_prefixed(prefix, _score_trained(spec, package, test)))
        for baseline, values in _score_baselines(spec, test).items():
            baselines[baseline].update(_prefixed(prefix, values))
    return trained, baselines


def _prefixed(prefix: str, values: Mapping[str, float]) -> dict[str, float]:
    return {f"{prefix}{key}": value for key, value in values.items()}


def _score_trained(spec: JobSpec, package: ModelPackage, test: ImageDataset) -> dict[str, float]:
    vectors = embed_dataset(
        functools.partial(package.method.embed, package.model), test, batch_size=spec.train.embed_batch_size
    )
    return score_embeddings(vectors, test.labels, ks=spec.evaluation.recall_ks)


def _score_baselines(spec: JobSpec, test: ImageDataset) -> dict[str, dict[str, float]]:
    scores: dict[str, dict[str, float]] = {}
    for baseline in spec.evaluation.baselines:
        if baseline == "raw_pixels":
            vectors = raw_pixel_embeddings(test, batch_size=spec.train.embed_batch_size)
        else:
            # Seeded by the job: the same untrained network on every split.
            torch.manual_seed(spec.train.seed)
            method = build_method(spec)
            untrained = method.build_model().eval()
            vectors = embed_dataset(
                functools.partial(method.embed, untrained), test, batch_size=spec.train.embed_batch_size
            )
        scores[baseline] = score_embeddings(vectors, test.labels, ks=spec.evaluation.recall_ks)
    return scores


def _history(result: ray.train.Result) -> list[dict[str, float]]:
    frame = getattr(result, "metrics_dataframe", None)
    if frame is None or frame.empty:
        return [dict(result.metrics or {})] if result.metrics else []
    return [row for row in frame.to_dict("records")]


def _yaml(spec: JobSpec) -> str:
    import yaml

    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)

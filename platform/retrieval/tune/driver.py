"""`retrieval tune`: a loss-weight sweep of a method with Ray Tune, tracked in MLflow.

Data flow: sweep file (tune_spaces/) -> checked against its base job -> one MLflow parent
run -> Tune trials, each a Ray Train job with its own MLflow child run -> ASHA stops weak
trials between epochs -> the best trial's model is evaluated and registered (alias
`candidate`, tagged with the sweep) -> a results table and a plot of every swept key
against the metric on the parent run. Running the same command again after the driver
died restores the Tune experiment: finished trials are not run again.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import ray
import ray.train
import ray.tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator, SearchAlgorithm, Searcher

from retrieval.config import Distribution, LoadedSweep, SweepSpec, load_sweep_spec, sweep_metric_names
from retrieval.errors import ConfigError
from retrieval.evaluation.plots import sweep_figure
from retrieval.tracking.registry import RegisteredModel, set_alias
from retrieval.tracking.runs import TrainingRun, metric_key
from retrieval.train.driver import check_job_inputs, register_checkpoint, storage_location
from retrieval.tune.trial import PARENT_TAG, SWEEP_TAG, TRIAL_TAG, SweepContext, run_trial, trial_job, trial_storage

logger = logging.getLogger(__name__)

EARLY_STOPPED_TAG = "retrieval.early_stopped"
TRIAL_ACTOR_CPUS = 0.01


@dataclass
class TrialRow:
    """One line of a sweep's results table."""

    trial_id: str
    values: dict[str, Any]
    metric: float
    epochs: int
    status: str
    others: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "trial_id": self.trial_id,
            **self.values,
            "metric": self.metric,
            **self.others,
            "epochs": self.epochs,
            "status": self.status,
        }


@dataclass
class SweepOutcome:
    """What a finished sweep produced."""

    name: str
    metric: str
    mode: str
    rows: list[TrialRow]
    best_trial_id: str
    best_metrics: dict[str, float]
    model: RegisteredModel
    parent_run_id: str
    resumed: bool
    experiment_path: str
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)

    def table(self) -> str:
        """The printed results table: one row per trial, best first."""
        keys = sorted({key for row in self.rows for key in row.values})
        others = sorted({key for row in self.rows for key in row.others})
        header = ["trial", *keys, self.metric, *others, "epochs", "status"]
        ordered = sorted(self.rows, key=lambda row: _sort_key(row.metric, self.mode))
        lines = [header]
        for row in ordered:
            marker = " *" if row.trial_id == self.best_trial_id else ""
            lines.append(
                [
                    row.trial_id + marker,
                    *(_format_value(row.values.get(key)) for key in keys),
                    f"{row.metric:.4f}",
                    *(f"{row.others.get(key, math.nan):.4f}" for key in others),
                    str(row.epochs),
                    row.status,
                ]
            )
        widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
        return "\n".join(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in lines
        )

    def rows_best_metric(self) -> float:
        return next(row.metric for row in self.rows if row.trial_id == self.best_trial_id)

    def summary(self) -> dict[str, Any]:
        return {
            "sweep": self.name,
            "metric": self.metric,
            "mode": self.mode,
            "best_trial": self.best_trial_id,
            "best_metrics": self.best_metrics,
            "model": {"name": self.model.name, "version": self.model.version, "aliases": list(self.model.aliases)},
            "mlflow_parent_run_id": self.parent_run_id,
            "resumed": self.resumed,
            "experiment_path": self.experiment_path,
            "trials": [row.as_dict() for row in self.rows],
        }


def check_trial_resources(spec: SweepSpec, cluster: Mapping[str, float], *, source: str) -> None:
    """Refuse a sweep whose trials cannot fit the cluster, before any trial starts.

    Raises:
        ConfigError: one trial needs more CPUs/GPUs than the cluster has, or
            `max_concurrent_trials` trials at once would.
    """
    resources = spec.resources
    for kind, need in (("CPU", resources.cpus + TRIAL_ACTOR_CPUS), ("GPU", resources.gpus)):
        have = float(cluster.get(kind, 0.0))
        if need > have:
            raise ConfigError(
                f"{source}: one trial needs {need:g} {kind}s ({resources.num_workers} workers) but the cluster "
                f"has {have:g}; lower resources.num_workers or resources.{kind.lower()}s_per_worker"
            )
        together = need * spec.max_concurrent_trials
        if need > 0 and together > have:
            fits = int(have // need)
            raise ConfigError(
                f"{source}: max_concurrent_trials={spec.max_concurrent_trials} trials x {need:g} {kind}s = "
                f"{together:g} {kind}s, but the cluster has {have:g}; at most {fits} trials fit at once"
            )


def tune_distribution(distribution: Distribution) -> Any:
    """The Ray Tune search-space object of one key."""
    if distribution.uniform is not None:
        return ray.tune.uniform(*distribution.uniform)
    if distribution.loguniform is not None:
        return ray.tune.loguniform(*distribution.loguniform)
    if distribution.randint is not None:
        return ray.tune.randint(*distribution.randint)
    if distribution.choice is not None:
        return ray.tune.choice(distribution.choice)
    return ray.tune.grid_search(distribution.grid or [])


def build_scheduler(sweep: LoadedSweep) -> TrialScheduler:
    settings = sweep.spec.scheduler
    if settings.name == "fifo":
        return FIFOScheduler()
    # An incremental trial reports once per task, a plain one once per epoch.
    steps = trial_steps(sweep)
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=steps,
        grace_period=min(settings.grace_period, steps),
        reduction_factor=settings.reduction_factor,
    )


def trial_steps(sweep: LoadedSweep) -> int:
    """How many reports a trial that runs to the end makes: epochs, or tasks for an incremental job."""
    job = sweep.base_job
    return len(job.incremental.tasks) if job.incremental is not None else job.train.epochs


def build_search(spec: SweepSpec) -> SearchAlgorithm | Searcher:
    if spec.search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=spec.search.seed)
    # Tune ignores TuneConfig.max_concurrent_trials when given a BasicVariantGenerator: the limit goes here.
    return BasicVariantGenerator(random_state=spec.search.seed, max_concurrent=spec.max_concurrent_trials)


def run_sweep(sweep_file: str | Path, *, overrides: Sequence[str] = ()) -> SweepOutcome:
    """Run (or resume) the sweep described by a `tune_spaces/` file and register its best model.

    Args:
        sweep_file: the sweep YAML.
        overrides: `dotted.key=value` overrides of the sweep file (e.g. `num_samples=8`).
    """
    sweep = load_sweep_spec(sweep_file, overrides)
    spec = sweep.spec
    check_job_inputs(sweep.base_job)
    if not ray.is_initialized():
        ray.init()
    check_trial_resources(spec, ray.cluster_resources(), source=str(sweep_file))

    storage = spec.storage or sweep.base_job.storage.path
    storage = storage if "://" in storage else str(Path(storage).resolve())
    experiment_path = f"{storage.rstrip('/')}/{spec.name}"
    tracking = sweep.base_job.tracking
    parent, _ = TrainingRun.start_or_resume(
        tracking_uri=tracking.uri(),
        experiment=tracking.experiment,
        artifact_location=tracking.artifact_location,
        run_key=f"sweep:{experiment_path}",
        run_name=spec.name,
        params={"sweep": spec.model_dump(mode="json")},
        tags={SWEEP_TAG: spec.name, "retrieval.kind": "sweep", "retrieval.method": sweep.base_job.method.name},
        reuse_finished=True,
    )
    context = SweepContext(
        sweep_file=str(Path(sweep_file).resolve()),
        sweep_overrides=tuple(overrides),
        parent_run_id=parent.run_id,
        tracking_uri=parent.tracking_uri,
        experiment=tracking.experiment,
        trials_storage=trial_storage(storage, spec.name),
    )
    # The trial actor only waits on its TorchTrainer; the Train workers hold the CPUs/GPUs.
    # Tune refuses an empty request, so the trial asks for a sliver of a CPU.
    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, context=context), {"cpu": TRIAL_ACTOR_CPUS})

    # With storage.endpoint_url (MinIO and other S3-compatible stores) Tune gets the filesystem.
    tune_storage, filesystem = storage_location(sweep.base_job, storage)
    tune_experiment = f"{tune_storage.rstrip('/')}/{spec.name}" if filesystem else experiment_path
    resumed = ray.tune.Tuner.can_restore(tune_experiment, storage_filesystem=filesystem)
    if resumed:
        tuner = ray.tune.Tuner.restore(
            tune_experiment,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=filesystem,
        )
        finished = tuner.get_results().num_terminated
        message = (
            f"resuming sweep {spec.name!r} from {experiment_path}: {finished} finished trial(s) are kept "
            "and not run again"
        )
        logger.warning(message)
        print(message, flush=True)
    else:
        tuner = ray.tune.Tuner(
            trainable,
            param_space={key: tune_distribution(value) for key, value in spec.space.items()},
            tune_config=ray.tune.TuneConfig(
                metric=spec.metric,
                mode=spec.mode,
                num_samples=spec.num_samples,
                max_concurrent_trials=spec.max_concurrent_trials,
                scheduler=build_scheduler(sweep),
                search_alg=build_search(spec),
            ),
            run_config=ray.tune.RunConfig(name=spec.name, storage_path=tune_storage, storage_filesystem=filesystem),
        )
    try:
        results = tuner.fit()
        outcome = _record(sweep, results, parent=parent, resumed=resumed, experiment_path=experiment_path)
    except BaseException:
        parent.finish(status="FAILED")
        raise
    parent.finish()
    return outcome


def _record(
    sweep: LoadedSweep, results: ray.tune.ResultGrid, *, parent: TrainingRun, resumed: bool, experiment_path: str
) -> SweepOutcome:
    spec = sweep.spec
    epochs = trial_steps(sweep)
    children = _children(parent)
    rows: list[TrialRow] = []
    by_trial: dict[str, ray.tune.Result] = {}
    for index in range(len(results)):
        result = results[index]
        metrics = result.metrics or {}
        trial_id = str(metrics.get("trial_id") or Path(result.path).name)
        by_trial[trial_id] = result
        values = {key: (result.config or {}).get(key) for key in spec.space}
        done = int(metrics.get("training_iteration", 0))
        if result.error is not None:
            status = "error"
        elif done < epochs:
            status = "stopped early"
        else:
            status = "finished"
        rows.append(
            TrialRow(
                trial_id=trial_id,
                values=values,
                metric=float(metrics.get(spec.metric, math.nan)),
                epochs=done,
                status=status,
                # The job's other held-out metrics, so an ablation's table shows every direction.
                others={
                    name: float(metrics[name])
                    for name in sweep_metric_names(sweep.base_job)
                    if name != spec.metric and isinstance(metrics.get(name), int | float)
                },
            )
        )
        child_id = children.get(trial_id)
        if child_id is not None and status != "finished":
            # ASHA kills a stopped trial's actor before its run can close itself.
            child_run = TrainingRun(
                tracking_uri=parent.tracking_uri, run_id=child_id, experiment_id=parent.experiment_id
            )
            child_run.set_tag(EARLY_STOPPED_TAG, str(status == "stopped early").lower())
            child_run.finish(status="KILLED" if status == "stopped early" else "FAILED")

    scored = [row for row in rows if math.isfinite(row.metric) and row.status != "error"]
    if not scored:
        raise RuntimeError(f"sweep {spec.name!r}: no trial reported {spec.metric!r}; see the trials' errors above")
    best_row = min(scored, key=lambda row: _sort_key(row.metric, spec.mode))
    best = by_trial[best_row.trial_id]
    best_metrics = {key: float(value) for key, value in (best.metrics or {}).items() if _is_metric(key, value)}

    best_child_id = children.get(best_row.trial_id)
    if best_child_id is None:
        raise RuntimeError(f"sweep {spec.name!r}: no MLflow run found for the best trial {best_row.trial_id}")
    child = TrainingRun(tracking_uri=parent.tracking_uri, run_id=best_child_id, experiment_id=parent.experiment_id)
    job = trial_job(sweep, best.config or {}, trial_id=best_row.trial_id)
    registered_tag = parent.client.get_run(parent.run_id).data.tags
    if job.incremental is not None:
        # Each task of the trial registered its own version; the best trial's last one is the candidate.
        version = child.client.get_run(child.run_id).data.tags.get("retrieval.registered_version")
        if version is None:
            raise RuntimeError(f"sweep {spec.name!r}: the best trial {best_row.trial_id} registered no version")
        set_alias(tracking_uri=parent.tracking_uri, name=job.registered_model_name, alias="candidate", version=version)
        for key, value in {
            SWEEP_TAG: spec.name,
            "retrieval.sweep_run_id": parent.run_id,
            TRIAL_TAG: best_row.trial_id,
        }.items():
            parent.client.set_model_version_tag(job.registered_model_name, version, metric_key(key), value)
        model = RegisteredModel(name=job.registered_model_name, version=version, aliases=("candidate",))
        baselines: dict[str, dict[str, float]] = {}
        parent.set_tag("retrieval.best_trial", best_row.trial_id)
        parent.set_tag("retrieval.registered_version", version)
    elif (
        registered_tag.get("retrieval.best_trial") == best_row.trial_id
        and "retrieval.registered_version" in registered_tag
    ):
        version = registered_tag["retrieval.registered_version"]
        model = RegisteredModel(name=job.registered_model_name, version=version, aliases=("candidate",))
        baselines = {}
        logger.info("sweep %s: best trial %s already registered as version %s", spec.name, best_row.trial_id, version)
    else:
        checkpoint_path = (best.metrics or {}).get(CHECKPOINT_PATH_KEY)
        if not checkpoint_path:
            raise RuntimeError(f"sweep {spec.name!r}: the best trial {best_row.trial_id} reported no checkpoint")
        history = best.metrics_dataframe.to_dict("records") if best.metrics_dataframe is not None else []
        registered = register_checkpoint(
            job,
            checkpoint=ray.train.Checkpoint(path=str(checkpoint_path), filesystem=storage_location(job)[1]),
            run=child,
            history=history,
            promote_with_gate=False,
            tags={SWEEP_TAG: spec.name, "retrieval.sweep_run_id": parent.run_id, TRIAL_TAG: best_row.trial_id},
        )
        model, baselines = registered.model, registered.baselines
        parent.set_tag("retrieval.best_trial", best_row.trial_id)
        parent.set_tag("retrieval.registered_version", model.version)

    parent.log_metrics({f"best/{spec.metric}": best_row.metric})
    for key, value in best_row.values.items():
        parent.client.log_param(parent.run_id, f"best.{key}", str(value))
    parent.log_dict(
        {"metric": spec.metric, "mode": spec.mode, "trials": [row.as_dict() for row in rows]}, "sweep/results.json"
    )
    figure = sweep_figure(
        [row.values for row in scored], [row.metric for row in scored], metric=spec.metric, title=spec.name
    )
    parent.log_figure(figure, "sweep/metric_vs_weights.png")
    plt.close(figure)
    outcome = SweepOutcome(
        name=spec.name,
        metric=spec.metric,
        mode=spec.mode,
        rows=rows,
        best_trial_id=best_row.trial_id,
        best_metrics=best_metrics,
        model=model,
        parent_run_id=parent.run_id,
        resumed=resumed,
        experiment_path=experiment_path,
        baselines=baselines,
    )
    parent.client.log_text(parent.run_id, outcome.table() + "\n", "sweep/table.txt")
    return outcome


def _children(parent: TrainingRun) -> dict[str, str]:
    """trial id -> MLflow run id of the parent's child runs."""
    runs = parent.client.search_runs(
        [parent.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent.run_id}'", max_results=10_000
    )
    return {run.data.tags[TRIAL_TAG]: run.info.run_id for run in runs if TRIAL_TAG in run.data.tags}


def _sort_key(value: float, mode: str) -> float:
    if not math.isfinite(value):
        return math.inf
    return -value if mode == "max" else value


def _is_metric(key: str, value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and (key.startswith(("recall@", "map@", "train/", "seen_mean/", "forgetting/")) or key in ("epoch",))
    )


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)

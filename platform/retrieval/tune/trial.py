"""One trial of a sweep: the method's real Ray Train job, reporting each epoch to Tune.

Tune runs `run_trial` as a function trainable. It builds the trial's job spec (the base
job with the sampled values), opens the trial's MLflow child run under the sweep's parent
run, and fits a TorchTrainer whose `TuneReportCallback` forwards every epoch's metrics
(and the checkpoint path) to Tune, so ASHA can stop the trial between epochs. A trial
that Tune restores resumes its Train run from the last checkpoint and keeps its child run.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback

from retrieval.config import JobSpec, LoadedSweep, ScalingSpec, load_sweep_spec
from retrieval.tracking.runs import TrainingRun
from retrieval.train.driver import build_trainer

logger = logging.getLogger(__name__)

TRIAL_TAG = "retrieval.trial_id"
SWEEP_TAG = "retrieval.sweep"
PARENT_TAG = "mlflow.parentRunId"


@dataclass(frozen=True)
class SweepContext:
    """What every trial needs besides its sampled values (passed with `tune.with_parameters`)."""

    sweep_file: str
    sweep_overrides: tuple[str, ...]
    parent_run_id: str
    tracking_uri: str
    experiment: str
    trials_storage: str

    def load(self) -> LoadedSweep:
        return load_sweep_spec(self.sweep_file, self.sweep_overrides)


def trial_job(sweep: LoadedSweep, values: Mapping[str, Any], *, trial_id: str) -> JobSpec:
    """The job spec of one trial, with the sweep's per-trial resources as its scaling."""
    job = sweep.trial_job(values, name=f"{sweep.spec.name}-{trial_id}")
    resources = sweep.spec.resources
    per_worker: dict[str, float] = {"CPU": resources.cpus_per_worker}
    if resources.gpus_per_worker:
        per_worker["GPU"] = resources.gpus_per_worker
    scaling = ScalingSpec(
        num_workers=resources.num_workers,
        use_gpu=resources.gpus_per_worker > 0,
        resources_per_worker=per_worker,
        placement_strategy=job.scaling.placement_strategy,
    )
    return job.model_copy(update={"scaling": scaling})


def run_trial(config: dict[str, Any], context: SweepContext) -> None:
    """Tune function trainable: train one trial's job with Ray Train, reporting every epoch."""
    tune_context = ray.tune.get_context()
    trial_id = tune_context.get_trial_id()
    sweep = context.load()
    job = trial_job(sweep, config, trial_id=trial_id)
    run, resumed = TrainingRun.start_or_resume(
        tracking_uri=context.tracking_uri,
        experiment=context.experiment,
        run_key=f"{context.trials_storage}/{trial_id}",
        run_name=tune_context.get_trial_name(),
        params=job.model_dump(mode="json"),
        tags={
            PARENT_TAG: context.parent_run_id,
            SWEEP_TAG: sweep.spec.name,
            TRIAL_TAG: trial_id,
            "retrieval.method": job.method.name,
            "retrieval.dataset": job.dataset.name,
        },
    )
    if resumed:
        logger.info("trial %s resumes its MLflow run %s", trial_id, run.run_id)
    for key, value in config.items():
        run.client.log_param(run.run_id, f"sweep.{key}", str(value))
    if job.incremental is not None:
        _run_incremental_trial(job, run=run, storage=context.trials_storage, trial_id=trial_id)
        return
    trainer = build_trainer(
        job,
        run=run,
        name=trial_id,
        storage=context.trials_storage,
        callbacks=[TuneReportCallback()],
    )
    try:
        trainer.fit()
    except BaseException:
        run.finish(status="FAILED")
        raise
    run.finish()


def _run_incremental_trial(job: JobSpec, *, run: TrainingRun, storage: str, trial_id: str) -> None:
    """An incremental trial: the whole task sequence, reporting to Tune after every task.

    Each task registers its version (alias `candidate` only: a sweep never promotes a champion)
    and the trial's run keeps the last one in its `retrieval.registered_version` tag.
    """
    from retrieval.train.incremental import run_incremental

    trial = job.model_copy(update={"storage": job.storage.model_copy(update={"path": f"{storage}/{trial_id}"})})
    try:
        run_incremental(trial, run=run, report=ray.tune.report, promote=False)
    except BaseException:
        run.finish(status="FAILED")
        raise
    run.finish()


def trial_storage(storage: str, sweep_name: str) -> str:
    """Where the trials' Ray Train runs keep their checkpoints (beside Tune's experiment folder)."""
    return (
        f"{storage.rstrip('/')}/{sweep_name}-trials"
        if "://" in storage
        else str(Path(storage) / f"{sweep_name}-trials")
    )

"""Sweep settings: a sweep file (`SweepSpec`: base job, search space, scheduler, trial resources), the
metrics its trials report, and `load_sweep_spec`, which checks it against its base job. The sweeps run
in `retrieval.tune` (Ray Tune).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from retrieval.config.base import _NAME_PATTERN, StrictModel
from retrieval.config.job import JobSpec
from retrieval.config.loading import parse_override, read_yaml_mapping, set_dotted
from retrieval.config.validation import _validate
from retrieval.errors import ConfigError

DISTRIBUTIONS: tuple[str, ...] = ("uniform", "loguniform", "randint", "choice", "grid")


class Distribution(StrictModel):
    """How one job-spec key varies across the trials of a sweep; exactly one field is set.

    YAML: `{uniform: [low, high]}`, `{loguniform: [low, high]}` (low > 0),
    `{randint: [low, high]}` (high exclusive), `{choice: [a, b, c]}` (sampled) or
    `{grid: [a, b, c]}` (every value, crossed with the other grid keys).
    """

    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None
    choice: list[Any] | None = Field(None, min_length=1)
    grid: list[Any] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _exactly_one(self) -> Distribution:
        given = [name for name in DISTRIBUTIONS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one distribution out of {', '.join(DISTRIBUTIONS)}; got {given or 'none'}")
        bounds = self.uniform or self.loguniform or self.randint
        if bounds is not None and not bounds[0] < bounds[1]:
            raise ValueError(f"{self.kind}: low ({bounds[0]}) must be smaller than high ({bounds[1]})")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform: low must be positive, got {self.loguniform[0]}")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in DISTRIBUTIONS if getattr(self, name) is not None)

    def candidates(self) -> list[Any]:
        """Values a trial may get that are checked against the job spec before anything runs."""
        if self.uniform is not None:
            return list(self.uniform)
        if self.loguniform is not None:
            return list(self.loguniform)
        if self.randint is not None:
            return [self.randint[0], self.randint[1] - 1]
        return list(self.choice or self.grid or [])


class SchedulerSpec(StrictModel):
    """Early stopping of trials: ASHA (asynchronous successive halving) or none (`fifo`).

    Time is counted in epochs (one Tune iteration per reported epoch).
    """

    name: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1, description="epochs every trial runs before it may be stopped")
    reduction_factor: float = Field(2.0, gt=1.0)


class SearchSpec(StrictModel):
    algorithm: Literal["random", "optuna"] = Field("random", description="random search, or Optuna's TPE")
    seed: int | None = 0


class TrialResourcesSpec(StrictModel):
    """What one trial's Ray Train job asks for; replaces the base job's `scaling`."""

    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, ge=0.0)
    gpus_per_worker: float = Field(0.0, ge=0.0)

    @property
    def cpus(self) -> float:
        return self.num_workers * self.cpus_per_worker

    @property
    def gpus(self) -> float:
        return self.num_workers * self.gpus_per_worker


class SweepSpec(StrictModel):
    """A loss-weight sweep: a base job spec, the keys to vary, and how to search and stop.

    Space keys are dotted paths into the job spec (`method.ms_alpha`, `optimizer.lr`);
    `overrides` fixes keys for every trial (e.g. fewer epochs than the base job).
    """

    name: str = Field(pattern=_NAME_PATTERN)
    description: str = ""
    base_job: str = Field(description="job spec YAML, relative to this file")
    overrides: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, Distribution] = Field(min_length=1)
    metric: str = "recall@1"
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(4, ge=1)
    max_concurrent_trials: int = Field(1, ge=1)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)
    resources: TrialResourcesSpec = Field(default_factory=TrialResourcesSpec)
    storage: str | None = Field(None, description="Tune experiment root; default the base job's storage.path")

    @model_validator(mode="after")
    def _grid_needs_random_search(self) -> SweepSpec:
        grid_keys = [key for key, value in self.space.items() if value.grid is not None]
        if grid_keys and self.search.algorithm != "random":
            raise ValueError(f"'grid' ({', '.join(grid_keys)}) works with search 'random' only, not Optuna")
        return self

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str) -> SweepSpec:
        return _validate(cls, data, source=source)


def sweep_metric_names(job: JobSpec) -> list[str]:
    """Metrics every epoch of a trial reports on the held-out split, usable as a sweep's `metric`.

    A trial of an incremental job reports once per task: the means over the tasks seen so far
    and the mean forgetting of the old tasks (0 after the first task).
    """
    if job.incremental is not None:
        return [f"seen_mean/recall@{k}" for k in job.evaluation.recall_ks] + ["seen_mean/map@r", "forgetting/mean"]
    if job.method.name == "cross_modal_hashing":
        top_n = job.evaluation.map_top_n
        return [
            "map@all",
            "i2t/map@all",
            "t2i/map@all",
            f"i2t/map@{top_n}",
            f"t2i/map@{top_n}",
            "disc/feature_accuracy",
            "disc/code_accuracy",
            "train/loss",
        ]
    if job.method.name == "adversarial_cross_modal":
        ks = job.evaluation.recall_ks
        return [
            "rsum",
            *(f"i2t/recall@{k}" for k in ks),
            *(f"t2i/recall@{k}" for k in ks),
            "disc/feature_accuracy",
            "train/loss",
        ]
    return [f"recall@{k}" for k in job.evaluation.recall_ks] + ["map@r", "train/loss"]


@dataclass(frozen=True)
class LoadedSweep:
    """A validated sweep with its base job: the raw mapping trials start from and its validation."""

    spec: SweepSpec
    source: Path
    base: dict[str, Any]
    base_job: JobSpec

    def trial_job(self, values: Mapping[str, Any], *, name: str) -> JobSpec:
        """The job spec of one trial: the base job with the trial's sampled `values` set."""
        data = copy.deepcopy(self.base)
        for key, value in values.items():
            set_dotted(data, key, value, source=f"{self.source}: space")
        data["name"] = name
        return JobSpec.from_mapping(data, source=f"{self.source} trial {name}")


def load_sweep_spec(path: str | Path, overrides: Sequence[str] = ()) -> LoadedSweep:
    """Read a sweep file and check it against its base job before anything runs.

    Every space key must be a key of the job spec, and every value a trial can get (the
    bounds of a range, each choice or grid value) must give a valid job spec; the metric
    must be one the trials report.

    Args:
        path: the sweep YAML (`tune_spaces/...`).
        overrides: `dotted.key=value` strings applied to the sweep file's mapping.

    Raises:
        ConfigError: naming the file and the offending key.
    """
    file = Path(path)
    data = read_yaml_mapping(file)
    for override in overrides:
        key, value = parse_override(override)
        if key.startswith("overrides."):
            # The sweep's overrides are flat dotted keys of the base job: `overrides.train.epochs=3` sets the
            # key `train.epochs` there (nested, it would replace the base job's whole `train` section).
            section = data.setdefault("overrides", {})
            if not isinstance(section, dict):
                raise ConfigError(f"--set {override!r}: {file}'s 'overrides' is not a mapping")
            section[key.removeprefix("overrides.")] = value
        else:
            set_dotted(data, key, value, source=f"--set {override!r}")
    spec = SweepSpec.from_mapping(data, source=str(file))
    base_file = (file.parent / spec.base_job).resolve()
    if not base_file.is_file():
        raise ConfigError(f"{file}: base_job {spec.base_job!r} not found (looked for {base_file})")
    base = read_yaml_mapping(base_file)
    for key, value in spec.overrides.items():
        set_dotted(base, key, value, source=f"{file}: overrides")
    base_job = JobSpec.from_mapping(base, source=f"{base_file} with the overrides of {file}")
    for key, distribution in spec.space.items():
        for value in distribution.candidates():
            trial = copy.deepcopy(base)
            set_dotted(trial, key, value, source=f"{file}: space")
            try:
                JobSpec.from_mapping(trial, source=f"{file}")
            except ConfigError as error:
                detail = str(error).split("invalid spec:", 1)[-1].strip()
                raise ConfigError(
                    f"{file}: space key {key!r} ({distribution.kind}, value {value!r}) does not fit "
                    f"the job spec {base_file.name}: {detail}"
                ) from None
    metrics = sweep_metric_names(base_job)
    if spec.metric not in metrics:
        raise ConfigError(f"{file}: metric {spec.metric!r} is not reported by the trials; choose one of {metrics}")
    return LoadedSweep(spec=spec, source=file, base=base, base_job=base_job)

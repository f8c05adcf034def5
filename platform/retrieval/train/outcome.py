"""What a finished training job produced, the one registration path, and the gate that decides `champion`.

Shared by the job driver (`retrieval.train.driver`) and the task-sequence runner
(`retrieval.train.incremental`) without importing one another.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retrieval.config import JobSpec
from retrieval.tracking.registry import RegisteredModel, register_model_package, set_alias
from retrieval.tracking.runs import TrainingRun

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingOutcome:
    """What a finished job produced (the registered version, its scores, whether it became champion)."""

    metrics: dict[str, float]
    baselines: dict[str, dict[str, float]]
    model: RegisteredModel
    promoted: bool
    gate: list[str]
    run_id: str
    checkpoint_path: str
    epochs_run: list[int] = field(default_factory=list)
    resumed: bool = False

    def summary(self) -> dict[str, Any]:
        return {
            "metrics": self.metrics,
            "baselines": self.baselines,
            "model": {
                "name": self.model.name,
                "version": self.model.version,
                "aliases": list(self.model.aliases),
                "uri": self.model.uri,
            },
            "promoted_to_champion": self.promoted,
            "gate": self.gate,
            "mlflow_run_id": self.run_id,
            "checkpoint": self.checkpoint_path,
        }


def apply_gate(
    spec: JobSpec,
    *,
    registered: RegisteredModel,
    metrics: Mapping[str, float],
    run: TrainingRun,
    promote_with_gate: bool,
) -> tuple[RegisteredModel, bool, list[str]]:
    """Make a just-registered version `champion` when `promote_with_gate` and the job's gate holds.

    Returns the version (with its aliases), whether it was promoted, and the gate as text; tags
    the run with the version.
    """
    gate = [str(condition) for condition in spec.tracking.gate]
    promoted = promote_with_gate and all(condition.holds(metrics) for condition in spec.tracking.gate)
    if promoted:
        set_alias(tracking_uri=run.tracking_uri, name=registered.name, alias="champion", version=registered.version)
        registered = RegisteredModel(
            name=registered.name, version=registered.version, aliases=(*registered.aliases, "champion")
        )
        logger.info("gate %s holds: %s v%s is champion", gate or "(none)", registered.name, registered.version)
    elif promote_with_gate:
        logger.warning("gate %s does not hold for %s: version %s stays candidate", gate, metrics, registered.version)
    run.set_tag("retrieval.registered_version", registered.version)
    return registered, promoted, gate


def register_package(
    spec: JobSpec,
    *,
    package_dir: Path,
    run: TrainingRun,
    metrics: Mapping[str, float],
    tags: Mapping[str, str],
    promote_with_gate: bool,
) -> tuple[RegisteredModel, bool, list[str]]:
    """Register a package from `run` as a new version (`candidate`); `champion` when the gate holds on `metrics`.

    The one registration path of every job and of every task of a sequence: the version is
    tagged with the job, the method's own tags (`RetrievalMethod.registration_tags`, passed in
    `tags` with the scores) and the package digest (by `register_model_package`).
    """
    registered = register_model_package(
        package_dir,
        tracking_uri=run.tracking_uri,
        run_id=run.run_id,
        registered_model=spec.registered_model_name,
        aliases=("candidate",),
        tags={"retrieval.job": spec.name, **tags},
    )
    return apply_gate(spec, registered=registered, metrics=metrics, run=run, promote_with_gate=promote_with_gate)

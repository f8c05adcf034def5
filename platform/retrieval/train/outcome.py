"""What a finished training job produced, and the gate that decides whether it becomes `champion`.

Shared by every family's driver (image, cross-modal, incremental) without importing one another.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from retrieval.config import JobSpec
from retrieval.tracking.registry import RegisteredModel, set_alias
from retrieval.tracking.runs import TrainingRun

logger = logging.getLogger(__name__)


@dataclass
class TrainingOutcome:
    """What a finished job produced."""

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

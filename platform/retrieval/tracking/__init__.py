"""MLflow: runs, metrics, model registration, aliases, and loading models by URI."""

from retrieval.tracking.registry import (
    RegisteredModel,
    load_embedder,
    register_model_package,
    resolve_model_version,
)
from retrieval.tracking.runs import TrainingRun, resolve_tracking_uri

__all__ = [
    "RegisteredModel",
    "TrainingRun",
    "load_embedder",
    "register_model_package",
    "resolve_model_version",
    "resolve_tracking_uri",
]

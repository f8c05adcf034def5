"""What every spec shares: the strict base model, ImageNet's normalisation, the name pattern, and the
refusal of credentials in a URI. The specs themselves are in the other modules of `retrieval.config`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from retrieval.errors import url_has_credentials

# ImageNet's channel statistics: the normalisation of torchvision's pretrained backbones (and our default).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class StrictModel(BaseModel):
    """Base of every spec: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _without_credentials(value: str | None) -> str | None:
    """Refuse a URI that carries a user or password: specs are logged to MLflow and saved in packages."""
    if value is not None and url_has_credentials(value):
        raise ValueError(
            "must not contain a user or password: specs are logged to MLflow and saved with every model; "
            "set MLFLOW_TRACKING_URI (and MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD for a tracking "
            "server) in the environment instead and leave tracking_uri null"
        )
    return value

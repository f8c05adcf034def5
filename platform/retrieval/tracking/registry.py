"""The model registry: register a trained model package, move aliases, load by URI.

A registered version is an MLflow pyfunc model (models-from-code, `pyfunc_model.py`) whose artifacts are a model package
(`retrieval.methods.package`): `mlflow.pyfunc.load_model("models:/name@champion")` works
for anyone (it embeds a batch of images given as a float array `[B, 3, H, W]`), and the
platform itself loads the package to rebuild the exact model and preprocessing.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models.model import ModelInfo
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import Schema, TensorSpec

from retrieval import __version__
from retrieval.errors import IntegrityError, ModelNotFoundError
from retrieval.methods.package import ModelPackage, load_model_package, package_digest
from retrieval.tracking.runs import metric_key, resolve_tracking_uri

logger = logging.getLogger(__name__)

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[A-Za-z0-9_-]+))$")
PACKAGE_ARTIFACT = "package"
# The model version tag holding `package_digest` of the registered package, checked at every load.
PACKAGE_DIGEST_TAG = "retrieval.package_sha256"
_PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    version: str
    aliases: tuple[str, ...]

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def register_model_package(
    package_dir: str | Path,
    *,
    tracking_uri: str,
    run_id: str,
    registered_model: str,
    aliases: tuple[str, ...] = ("candidate",),
    tags: dict[str, str] | None = None,
) -> RegisteredModel:
    """Log a model package to a run as a pyfunc model and register it as a new version."""
    uri = resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    package = load_model_package(package_dir)
    digest = package_digest(package_dir)
    image_size = package.spec.dataset.image_size
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, image_size, image_size))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, package.dim))]),
    )
    with contextlib.ExitStack() as stack:
        if Path(package_dir).name != PACKAGE_ARTIFACT:
            # MLflow stores an artifact folder under its own name; loaders read `artifacts/package`.
            staging = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="retrieval-register-")))
            package_dir = shutil.copytree(package_dir, staging / PACKAGE_ARTIFACT)
        info = _log_pyfunc(package_dir, run_id=run_id, signature=signature, registered_model=registered_model)
    version = str(info.registered_model_version)
    client.set_model_version_tag(registered_model, version, PACKAGE_DIGEST_TAG, digest)
    for key, value in (tags or {}).items():
        client.set_model_version_tag(registered_model, version, metric_key(key), value)
    for alias in aliases:
        client.set_registered_model_alias(registered_model, alias, version)
    logger.info("registered %s version %s with aliases %s", registered_model, version, aliases)
    return RegisteredModel(name=registered_model, version=version, aliases=tuple(aliases))


def _log_pyfunc(package_dir: Path | str, *, run_id: str, signature: ModelSignature, registered_model: str) -> ModelInfo:
    """Log the package folder (named `package`) as a models-from-code pyfunc and register it."""
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        # The signature is the schema; an input example would add an image-sized array to
        # every version and a prediction at logging time, for nothing the signature does not say.
        warnings.filterwarnings("ignore", message=r".*An input example was not provided", category=UserWarning)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(_PYFUNC_CODE),
            signature=signature,
            artifacts={PACKAGE_ARTIFACT: str(package_dir)},
            registered_model_name=registered_model,
            pip_requirements=[f"retrieval-platform=={__version__}"],
        )
    return info


def set_alias(*, tracking_uri: str, name: str, alias: str, version: str) -> None:
    MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri)).set_registered_model_alias(name, alias, version)


def resolve_model_version(model_uri: str, *, tracking_uri: str | None = None) -> tuple[str, str]:
    """`models:/name/3` or `models:/name@alias` -> `(name, version)`.

    Raises:
        ModelNotFoundError: malformed URI, unknown model, version or alias.
    """
    found = _model_version(model_uri, tracking_uri=tracking_uri)
    return found.name, str(found.version)


def _model_version(model_uri: str, *, tracking_uri: str | None) -> ModelVersion:
    """The registry's record of the version ``model_uri`` names (name, version, tags)."""
    match = _MODELS_URI.match(model_uri)
    if not match:
        raise ModelNotFoundError(
            f"{model_uri!r} is not a model URI of the form models:/<name>/<version> or models:/<name>@<alias>"
        )
    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri) if tracking_uri else None)
    name = match.group("name")
    try:
        if match.group("alias"):
            return client.get_model_version_by_alias(name, match.group("alias"))
        return client.get_model_version(name, match.group("version"))
    except MlflowException as error:
        raise ModelNotFoundError(f"{model_uri}: no such registered model, version or alias ({error.message})") from None


def load_embedder(model_uri: str, *, tracking_uri: str | None = None, device: str = "cpu") -> ModelPackage:
    """Load a model for embedding from `models:/...` or from a local model-package folder.

    Registry downloads are cached per registry and version under `$RETRIEVAL_CACHE` (default
    `~/.cache/retrieval`), so a restarted replica does not download again. A cached or
    downloaded package is checked against the digest the registry recorded
    (`PACKAGE_DIGEST_TAG`): a cached copy that differs is downloaded again, a download that
    differs is refused.

    Raises:
        ModelNotFoundError: no such model, version, alias or package folder.
        IntegrityError: the artifact store holds files other than the registered ones.
    """
    if not model_uri.startswith("models:/"):
        if not Path(model_uri).is_dir():
            raise ModelNotFoundError(f"{model_uri}: neither a models:/ URI nor a model package folder")
        return load_model_package(model_uri, device=device)
    found = _model_version(model_uri, tracking_uri=tracking_uri)
    name, version = found.name, str(found.version)
    registry = resolve_tracking_uri(tracking_uri) if tracking_uri else mlflow.get_tracking_uri()
    expected = found.tags.get(PACKAGE_DIGEST_TAG)
    cache_root = Path(os.environ.get("RETRIEVAL_CACHE", Path.home() / ".cache" / "retrieval"))
    # Keyed by the registry too: two registries each have a version 1 of a model of the same name.
    registry_key = hashlib.sha256(registry.encode("utf-8")).hexdigest()[:16]
    target = cache_root / "models" / registry_key / name / version
    package_dir = target / "artifacts" / PACKAGE_ARTIFACT
    if (package_dir / "package.json").is_file() and expected is not None and package_digest(package_dir) != expected:
        logger.warning("cached models:/%s/%s in %s differs from the registered package; downloading it again",
                       name, version, target)  # fmt: skip
        stale = target.with_name(f".{version}.stale-{uuid.uuid4().hex[:8]}")
        os.replace(target, stale)  # aside first: a replica reading it keeps its open files
        shutil.rmtree(stale, ignore_errors=True)
    if not (package_dir / "package.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        if tracking_uri:
            mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
        with tempfile.TemporaryDirectory(dir=target.parent) as staging:
            mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=staging)
            # Another replica may have finished the same download first: its copy is identical.
            if not target.exists():
                os.replace(staging, target)
                os.makedirs(staging, exist_ok=True)  # so the context manager's cleanup finds it
    _check_package_digest(expected, name, version, package_dir)
    return load_model_package(package_dir, device=device, source=f"models:/{name}/{version}")


def _check_package_digest(expected: str | None, name: str, version: str, package_dir: Path) -> None:
    """Refuse a downloaded package whose files differ from what was registered."""
    if expected is None:
        logger.warning(
            "models:/%s/%s has no %s tag (registered before packages were digested): its files cannot be "
            "checked against the registry",
            name,
            version,
            PACKAGE_DIGEST_TAG,
        )
        return
    actual = package_digest(package_dir)
    if actual != expected:
        raise IntegrityError(
            f"models:/{name}/{version}: the package's files (digest {actual}) differ from the registered ones "
            f"(tag {PACKAGE_DIGEST_TAG} = {expected}): the artifact store was modified after registration; "
            "refusing to load it"
        )

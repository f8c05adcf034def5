"""What the model registry holds, for people: registered models, versions, aliases, scores, runs.

Read-only views behind ``retrieval models list`` and ``retrieval models show``. A version's
scores are the score tags its run wrote when registering it (``test.*``, ``seen_mean.*``: exact
even when one run registered several versions, as an incremental job does, one per task), or,
for a version registered without them, the ``test/...`` metrics of its run. The index versions built from a version
are the ``retrieval.index.<version>`` tags that `record_index_version` writes when
``retrieval index`` builds one (a later prune does not remove the tag: ``retrieval index list``
says which still exist).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from retrieval.errors import ModelNotFoundError, redact_credentials
from retrieval.tracking.registry import PACKAGE_DIGEST_TAG
from retrieval.tracking.runs import resolve_tracking_uri

INDEX_TAG_PREFIX = "retrieval.index."
# Prefixes of the score tags a version gets at registration (see `register_checkpoint`, incremental `_register`).
SCORE_TAG_PREFIXES = ("test.", "seen_mean.")
RUN_SCORE_PREFIX = "test/"
# The scores `models list` shows in its table when a version has them (`--json` has them all).
HEADLINE_SCORES = ("recall@1", "map@r", "map", "mAP@R", "i2t/map", "t2i/map")
_REFERENCE = re.compile(r"^(?:models:/)?(?P<name>[^/@]+)(?:/(?P<version>[^/@]*)|@(?P<alias>[^/@]*))?$")


@dataclass(frozen=True)
class ModelVersionRecord:
    """One registered version with what people ask about it.

    Attributes:
        name: the registered model.
        version: the version number, as a string.
        aliases: the aliases pointing at it (``champion``, ``candidate``...).
        created: when it was registered (UTC).
        status: MLflow's registration status (``READY``...).
        run_id: the run that registered it (None for a version registered from outside a run).
        run_link: where to see that run (see `run_link`), None without a run.
        scores: its scores, readable names (``recall@1``) -> value.
        index_versions: index version -> where it was written, as recorded at build time.
        tags: every version tag.
        source: the version's source as MLflow records it.
        package_sha256: the digest of the registered model package (`PACKAGE_DIGEST_TAG`).
        run: the run's ``{"status", "metrics", "params", "tags", "experiment_id"}`` (``show`` only).
        artifact_uri: where the version's files are stored (``show`` only).
    """

    name: str
    version: str
    aliases: tuple[str, ...]
    created: datetime
    status: str
    run_id: str | None
    run_link: str | None
    scores: dict[str, float]
    index_versions: dict[str, str]
    tags: dict[str, str]
    source: str | None
    package_sha256: str | None
    description: str | None = None
    run: dict[str, Any] | None = None
    artifact_uri: str | None = None
    run_missing: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def headline_scores(self, limit: int = 3) -> dict[str, float]:
        """A few scores for a table: recall@1 and mAP first when present, else the first ones by name."""
        chosen = {key: self.scores[key] for key in HEADLINE_SCORES if key in self.scores}
        for key in sorted(self.scores):
            if len(chosen) >= limit:
                break
            chosen.setdefault(key, self.scores[key])
        return dict(list(chosen.items())[:limit])

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "uri": self.uri,
            "aliases": list(self.aliases),
            "created_at": self.created.isoformat(),
            "status": self.status,
            "run_id": self.run_id,
            "run_link": self.run_link,
            "scores": self.scores,
            "index_versions": self.index_versions,
            "package_sha256": self.package_sha256,
            "source": self.source,
            "description": self.description,
            "tags": self.tags,
        }
        if self.run is not None or self.run_missing is not None:
            data["run"] = self.run
            data["run_missing"] = self.run_missing
        if self.artifact_uri is not None:
            data["artifact_uri"] = self.artifact_uri
        return data


def readable_metric(key: str) -> str:
    """``recall_at_1`` -> ``recall@1`` (the inverse of `metric_key` for the platform's score names)."""
    return key.replace("_at_", "@")


def run_link(tracking_uri: str, *, run_id: str, experiment_id: str | None) -> str:
    """Where a person finds a run: its page on an MLflow server, or how to open a local store.

    An ``http(s)://`` tracking URI gives the run's page, ``<server>/#/experiments/<id>/runs/<run>``
    (a user or password in the URI is left out). Any other store (sqlite, a folder) has no
    server: the run id and the ``mlflow ui`` command that serves the store.
    """
    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith(("http://", "https://")):
        base = redact_credentials(uri).replace("***@", "").rstrip("/")
        if experiment_id is None:
            return f"{base}/#/runs/{run_id}"
        return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"run {run_id} (browse it with: mlflow ui --backend-store-uri {redact_credentials(uri)})"


def run_link_of(tracking_uri: str, run_id: str) -> str:
    """`run_link` of a run given by id alone (its experiment is looked up)."""
    try:
        experiment_id: str | None = _client(tracking_uri).get_run(run_id).info.experiment_id
    except MlflowException:
        experiment_id = None
    return run_link(tracking_uri, run_id=run_id, experiment_id=experiment_id)


def _client(tracking_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))


def _paged(fetch: Any) -> list[Any]:
    items: list[Any] = []
    token = None
    while True:
        page = fetch(token)
        items.extend(page)
        token = page.token
        if not token:
            return items


def _record(
    found: ModelVersion,
    *,
    aliases: tuple[str, ...],
    client: MlflowClient,
    tracking_uri: str,
    full: bool,
) -> ModelVersionRecord:
    tags = dict(found.tags or {})
    scores: dict[str, float] = {}
    run_info: dict[str, Any] | None = None
    run_missing = None
    experiment_id = None
    if found.run_id:
        try:
            run = client.get_run(found.run_id)
        except MlflowException as error:
            run_missing = f"run {found.run_id} cannot be read: {error.message}"
        else:
            experiment_id = run.info.experiment_id
            scores = {
                readable_metric(key.removeprefix(RUN_SCORE_PREFIX)): float(value)
                for key, value in run.data.metrics.items()
                if key.startswith(RUN_SCORE_PREFIX)
            }
            if full:
                run_info = {
                    "experiment_id": run.info.experiment_id,
                    "run_name": run.info.run_name,
                    "status": run.info.status,
                    "metrics": dict(sorted(run.data.metrics.items())),
                    "params": dict(sorted(run.data.params.items())),
                    "tags": {key: value for key, value in sorted(run.data.tags.items())},
                }
    registered_scores = {}
    for key, value in tags.items():
        prefix = next((prefix for prefix in SCORE_TAG_PREFIXES if key.startswith(prefix)), None)
        if prefix is None:
            continue
        try:
            registered_scores[readable_metric(key.removeprefix("test."))] = float(value)
        except ValueError:
            continue
    if registered_scores:
        # The run's scores as registered with this version: exact even when one run registered
        # several versions (an incremental job, one per task).
        scores = registered_scores
    artifact_uri = None
    if full:
        try:
            artifact_uri = client.get_model_version_download_uri(found.name, found.version)
        except MlflowException as error:
            artifact_uri = f"unknown ({error.message})"
    return ModelVersionRecord(
        name=found.name,
        version=str(found.version),
        aliases=aliases,
        created=datetime.fromtimestamp(found.creation_timestamp / 1000, UTC),
        status=str(found.status),
        run_id=found.run_id or None,
        run_link=run_link(tracking_uri, run_id=found.run_id, experiment_id=experiment_id) if found.run_id else None,
        scores=dict(sorted(scores.items())),
        index_versions={
            key.removeprefix(INDEX_TAG_PREFIX): value
            for key, value in sorted(tags.items())
            if key.startswith(INDEX_TAG_PREFIX)
        },
        tags=dict(sorted(tags.items())),
        source=found.source,
        package_sha256=tags.get(PACKAGE_DIGEST_TAG),
        description=found.description or None,
        run=run_info,
        artifact_uri=artifact_uri,
        run_missing=run_missing,
    )


def list_model_versions(*, tracking_uri: str, name: str | None = None) -> list[ModelVersionRecord]:
    """Every version of every registered model (or of ``name``), by model name then newest version first.

    Raises:
        ModelNotFoundError: ``name`` is given and no such model is registered.
    """
    client = _client(tracking_uri)
    if name is not None:
        try:
            models = [client.get_registered_model(name)]
        except MlflowException:
            known = [model.name for model in _paged(lambda token: client.search_registered_models(page_token=token))]
            raise ModelNotFoundError(
                f"no registered model {name!r} in {redact_credentials(tracking_uri)} "
                f"(registered: {', '.join(sorted(known)) or 'none'})"
            ) from None
    else:
        models = _paged(lambda token: client.search_registered_models(page_token=token))
    records = []
    for model in sorted(models, key=lambda model: model.name):
        aliases_of: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases_of.setdefault(str(version), []).append(alias)
        quoted = model.name.replace("'", "\\'")
        versions = _paged(
            lambda token, quoted=quoted: client.search_model_versions(f"name = '{quoted}'", page_token=token)
        )
        for found in sorted(versions, key=lambda version: int(version.version), reverse=True):
            records.append(
                _record(
                    found,
                    aliases=tuple(sorted(aliases_of.get(str(found.version), []))),
                    client=client,
                    tracking_uri=tracking_uri,
                    full=False,
                )
            )
    return records


def describe_model_version(reference: str, *, tracking_uri: str) -> ModelVersionRecord:
    """One version in full: ``NAME`` (its newest version), ``NAME/VERSION`` or ``NAME@ALIAS`` (``models:/`` optional).

    Raises:
        ModelNotFoundError: a malformed reference, or no such model, version or alias; the
            message lists what exists.
    """
    match = _REFERENCE.match(reference.strip())
    if not match or match.group("version") == "" or match.group("alias") == "":
        raise ModelNotFoundError(f"{reference!r}: expected NAME, NAME/VERSION or NAME@ALIAS")
    name, version, alias = match.group("name"), match.group("version"), match.group("alias")
    client = _client(tracking_uri)
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        known = [found.name for found in _paged(lambda token: client.search_registered_models(page_token=token))]
        raise ModelNotFoundError(
            f"no registered model {name!r} in {redact_credentials(tracking_uri)} "
            f"(registered: {', '.join(sorted(known)) or 'none'})"
        ) from None
    aliases = {str(key): str(value) for key, value in (model.aliases or {}).items()}
    quoted = name.replace("'", "\\'")
    versions = sorted(
        int(found.version)
        for found in _paged(lambda token: client.search_model_versions(f"name = '{quoted}'", page_token=token))
    )
    if alias is not None:
        if alias not in aliases:
            listed = ", ".join(f"@{key} -> {value}" for key, value in sorted(aliases.items())) or "none"
            raise ModelNotFoundError(f"model {name!r} has no alias {alias!r} (aliases: {listed})")
        version = aliases[alias]
    elif version is None:
        if not versions:
            raise ModelNotFoundError(f"model {name!r} has no versions")
        version = str(versions[-1])
    if not version.isdigit() or int(version) not in versions:
        raise ModelNotFoundError(
            f"model {name!r} has no version {version!r} (versions: {', '.join(map(str, versions)) or 'none'})"
        )
    found = client.get_model_version(name, version)
    return _record(
        found,
        aliases=tuple(sorted(key for key, value in aliases.items() if value == version)),
        client=client,
        tracking_uri=tracking_uri,
        full=True,
    )


def record_index_version(*, tracking_uri: str, name: str, version: str, index_version: str, location: str) -> None:
    """Tag a model version with an index version built from it (``retrieval.index.<index_version>`` = where)."""
    _client(tracking_uri).set_model_version_tag(name, version, f"{INDEX_TAG_PREFIX}{index_version}", location)

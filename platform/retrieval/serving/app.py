"""The Serve application builder: ``import_path: retrieval.serving.app:build_app``.

Example Serve config (see ``serve/digits.yaml``)::

    applications:
      - name: retrieval
        route_prefix: /
        import_path: retrieval.serving.app:build_app
        args: {index: indices/digits, tracking_uri: sqlite:///mlflow.db}
        runtime_env: {env_vars: {RETRIEVAL_ADMIN_TOKEN: "<a long random token>"}}

The admin token (for ``POST /admin/swap``, the rolling swap) is read by the ingress replicas
from the environment variable ``admin_token_env`` names; without it the admin routes answer 403.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray import serve

from retrieval.config import ServingSpec
from retrieval.index.manifest import MANIFEST_FILE, read_manifest
from retrieval.index.object_store import is_s3_uri, local_index_path, pin_index_version
from retrieval.serving.deployments import EmbedderDeployment, SearchIngress, ShardDeployment
from retrieval.serving.layout import choose_layout, index_file_bytes
from retrieval.serving.replica import new_swap_state_name

logger = logging.getLogger(__name__)

# In the distributed layout the ingress only awaits other deployments and merges a few lists:
# reserving a whole CPU for it (Serve's default) would leave none for the shards on a small machine.
DISTRIBUTED_INGRESS_NUM_CPUS = 0.0
# The ingress is async: it may hold many requests at once, which is what lets its router
# batches fill (Serve's default of 5 would cap every batch at 5).
INGRESS_MAX_ONGOING_REQUESTS = 256


def replica_max_ongoing_requests(spec: ServingSpec) -> int:
    """Calls one shard or embedder replica takes at once: room for two ``@serve.batch`` batches when batching."""
    return 2 * spec.max_batch_size if spec.batching else 8


def build_app(args: Mapping[str, Any]) -> serve.Application:
    """The application builder a Serve config names: ``import_path: retrieval.serving.app:build_app``.

    Serve calls a builder with exactly one argument, the config's ``args``, and refuses one that
    takes more (keyword-only ones included: ``Application builder functions should take exactly
    one parameter``), so the options for Python callers are `build_search_app`'s.

    Args:
        args: the `ServingSpec` fields, e.g. ``{"index": "indices/digits"}``.

    Returns:
        The application (see `build_search_app`).
    """
    return build_search_app(args)


def build_search_app(
    args: Mapping[str, Any], *, ingress_env: Mapping[str, str] | None = None, state_name: str | None = None
) -> serve.Application:
    """Build the search application from a Serve config's ``args`` (a `ServingSpec`).

    The index is resolved once, here: every deployment is given the absolute path of the
    same version's manifest, so all of them serve one version even if the index root's
    ``CURRENT`` moves while replicas start (ARCHITECTURE invariant 1). For an ``s3://`` index
    that is the version's ``s3://.../<version>/manifest.json``; each replica downloads what it
    needs into its node's cache (`retrieval.index.object_store.fetch_index`).

    The layout is resolved here too (`retrieval.serving.layout.choose_layout`): ``local`` gives
    the ingress every shard to search in-process, ``distributed`` one ``ShardN`` deployment per
    shard. ``embedder_layout: local`` embeds queries in the ingress instead of an ``Embedder``.

    That version is only the first one: a rolling swap (``POST /admin/swap``) moves every
    deployment to another version through the application's swap-state actor, and replicas
    started later come up on whatever version is active then (see `retrieval.serving.swap`).

    Args:
        args: the `ServingSpec` fields, e.g. ``{"index": "indices/digits"}`` or
            ``{"index": "s3://bucket/indices/digits", "endpoint_url": "http://minio:9000"}``.
        ingress_env: environment variables for the ingress replicas only, e.g. the admin
            token when the app is run from Python (a Serve config sets ``runtime_env`` instead).
        state_name: the name of the swap-state actor (default a fresh one); pass one to
            remove it with `retrieval.serving.replica.delete_swap_state` after ``serve.delete``.

    Returns:
        The application: the ``SearchIngress``, with ``Shard0..ShardN-1`` (distributed layout)
        and ``Embedder`` (distributed embedder) bound to it.

    Raises:
        ConfigError: unknown or invalid args.
        IndexIntegrityError: the index root or manifest is missing or malformed.
    """
    spec = ServingSpec.from_mapping(args, source="serve args")
    if is_s3_uri(spec.index):
        pinned_index = pin_index_version(spec.index, endpoint_url=spec.endpoint_url)
        manifest, version_dir = read_manifest(
            local_index_path(pinned_index, endpoint_url=spec.endpoint_url, cache_dir=spec.cache_dir, shards=())
        )
    else:
        manifest, version_dir = read_manifest(spec.index)
        pinned_index = str((Path(version_dir) / MANIFEST_FILE).resolve())
    choice = choose_layout(
        spec,
        index_bytes=0
        if spec.layout != "auto"
        else index_file_bytes(manifest, pinned_index, endpoint_url=spec.endpoint_url),
    )
    pinned = spec.model_copy(update={"index": pinned_index, "layout": choice.layout})
    state = state_name or new_swap_state_name()
    # mypy does not apply class decorators, so it sees the plain classes without `.options`.
    shards = None
    if choice.layout == "distributed":
        shards = [
            ShardDeployment.options(  # type: ignore[attr-defined]
                name=f"Shard{info.shard}",
                num_replicas=spec.shard_replicas,
                ray_actor_options=_actor_options(spec.shard_num_cpus, spec.shard_resources),
                max_replicas_per_node=spec.max_replicas_per_node,
                health_check_period_s=spec.health_check_period_s,
                max_ongoing_requests=replica_max_ongoing_requests(spec),
            ).bind(spec=pinned, shard=info.shard, state_name=state)
            for info in manifest.shards
        ]
    embedder = None
    if spec.embedder_layout == "distributed":
        embedder = EmbedderDeployment.options(  # type: ignore[attr-defined]
            name="Embedder",
            num_replicas=spec.embedder_replicas,
            ray_actor_options=_actor_options(spec.embedder_num_cpus, {}),
            max_replicas_per_node=spec.max_replicas_per_node,
            health_check_period_s=spec.health_check_period_s,
            max_ongoing_requests=replica_max_ongoing_requests(spec),
        ).bind(spec=pinned, state_name=state)
    logger.info(
        "serving index %s (%d shards, model %s) from %s: %s layout (%s)",
        manifest.index_version,
        len(manifest.shards),
        manifest.model.uri,
        version_dir,
        choice.layout,
        choice.reason,
    )
    ingress_cpus = spec.ingress_num_cpus
    if ingress_cpus is None:
        ingress_cpus = spec.shard_num_cpus if choice.layout == "local" else DISTRIBUTED_INGRESS_NUM_CPUS
    ingress_options = _actor_options(ingress_cpus, spec.ingress_resources)
    if ingress_env:
        ingress_options["runtime_env"] = {"env_vars": dict(ingress_env)}
    return SearchIngress.options(  # type: ignore[attr-defined]
        num_replicas=spec.ingress_replicas,
        ray_actor_options=ingress_options,
        max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS,
        health_check_period_s=spec.health_check_period_s,
        max_replicas_per_node=spec.max_replicas_per_node,
    ).bind(spec=pinned, shards=shards, embedder=embedder, state_name=state)


def _actor_options(num_cpus: float, resources: Mapping[str, float]) -> dict[str, Any]:
    options: dict[str, Any] = {"num_cpus": num_cpus}
    if resources:
        options["resources"] = dict(resources)
    return options

"""The Serve deployments: the HTTP ingress, and (distributed layout) one per index shard and the embedder.

Two layouts (`ServingSpec.layout`, resolved by `retrieval.serving.layout.choose_layout`):

- local: every ingress replica holds all the shards itself (a `ShardHost`) and searches them
  in-process on a thread pool: a query crosses Ray once (proxy -> ingress), as a search
  engine's coordinating node searches the shards it holds. With ``embedder_layout: local``
  it embeds image and text queries in-process too.
- distributed: one `ShardDeployment` per shard (and an `EmbedderDeployment`), reached through
  handles, for indices larger than one replica.

Every replica carries the index versions it holds and every call names the version it
wants (ARCHITECTURE invariant 1): a replica asked for a version it does not hold raises
`VersionNotLoadedError`, which the ingress retries, and never answers from another version.
Every replica follows the application's swap state (`retrieval.serving.replica`), so a rolling
swap works the same in both layouts: each replica loads the new version beside the old, the
ingress flips, requests in flight drain, the old version is freed. The ingress replica that
receives ``POST /admin/swap`` runs the swap (`retrieval.serving.swap.run_swap`).

Batching (``spec.batching``): the ingress gathers concurrent queries (`MicroBatcher`); shard and
embedder deployments gather concurrent calls with ``@serve.batch`` and answer each group of
equal (version, search parameters) with ONE Faiss or model call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from retrieval.config import ServingSpec
from retrieval.errors import IndexIntegrityError
from retrieval.index.manifest import IndexManifest, read_manifest
from retrieval.index.object_store import local_index_path
from retrieval.index.search_params import SearchParams
from retrieval.serving.clients import EmbedderClient, LocalEmbedderClient, LocalShardClient, ShardClient
from retrieval.serving.embedder_host import EmbedCall, EmbedderHost
from retrieval.serving.errors import BadIndexReferenceError, SwapFailedError
from retrieval.serving.handles import HandleEmbedderClient, HandleShardClient
from retrieval.serving.http import build_http_api
from retrieval.serving.metrics import ServingMetrics
from retrieval.serving.ray_metrics import RayServeSink
from retrieval.serving.replica import (
    ActorSwapState,
    VersionedReplica,
    actor_call,
    delete_swap_state,
    describe,
    new_swap_state_name,
)
from retrieval.serving.replies import ShardCall, ShardHits
from retrieval.serving.service import SearchService
from retrieval.serving.shard_host import ShardHost
from retrieval.serving.swap import Desired, IndexRef, InFlight, resolve_index_reference, run_swap

logger = logging.getLogger(__name__)

__all__ = [
    "EmbedderDeployment",
    "SearchIngress",
    "ShardDeployment",
    "delete_swap_state",
    "new_swap_state_name",
]

# How often the ingress checks for stalled shard calls, and the stall that makes it ask Serve about a shard.
SHARD_WATCH_INTERVAL_S = 0.5
# `@serve.batch` defaults; each replica applies its spec's values in its constructor.
_DEFAULT_BATCH_SIZE = 32
_DEFAULT_BATCH_WAIT_S = 0.002


def _search_params(params: SearchParams | Mapping[str, Any] | None) -> SearchParams:
    return params if isinstance(params, SearchParams) else SearchParams.from_mapping(params)


def _configure_batch(method: Any, spec: ServingSpec) -> None:
    """Apply the spec's batch size and wait to a ``@serve.batch`` method (its decorator set defaults)."""
    method.set_max_batch_size(spec.max_batch_size)
    method.set_batch_wait_timeout_s(spec.batch_wait_timeout_s)


def _raised(result: Any) -> Any:
    """A batched call's own result, or its error raised (a batch hands errors back as values)."""
    if isinstance(result, Exception):
        raise result
    return result


def _local_manifest(spec: ServingSpec, manifest_ref: str) -> Path:
    return local_index_path(manifest_ref, endpoint_url=spec.endpoint_url, cache_dir=spec.cache_dir, shards=())


@serve.deployment
class ShardDeployment(VersionedReplica):
    """Serves one shard of the index (distributed layout), verified against its manifest checksums on load.

    Holds one version, or two during a rolling swap (a `ShardHost` of one shard).

    Args:
        spec: the serving spec; ``spec.index`` names the manifest to load first (an ``s3://``
            one is fetched into the node's cache, this shard's files only).
        shard: the shard number in the manifest.
        state_name: the application's swap-state actor; None outside Serve (one fixed version).
    """

    def __init__(self, *, spec: ServingSpec, shard: int, state_name: str | None = None) -> None:
        self._spec = spec
        self._shard = shard
        self._host = ShardHost(spec=spec, shards=[shard])
        self._in_flight = InFlight()
        _configure_batch(self._search_batch, spec)
        manifest, _ = read_manifest(_local_manifest(spec, spec.index))
        self._init_versions(initial=IndexRef.of(manifest, spec.index), state_name=state_name)

    def prepare(self, manifest_ref: str) -> str:
        """Load the version ``manifest_ref`` names beside the ones held (see `ShardHost.prepare`)."""
        return self._host.prepare(manifest_ref)

    def _held_versions(self) -> list[str]:
        return self._host.versions()

    def _load_version(self, ref: IndexRef) -> None:
        self._host.prepare(ref.manifest)

    def _drop_version(self, version: str) -> None:
        self._host.drop(version)

    def loaded_versions(self) -> list[str]:
        """The index versions this replica holds."""
        return self._host.versions()

    def search(
        self,
        queries: np.ndarray,
        k: int,
        index_version: str,
        params: SearchParams | Mapping[str, Any] | None = None,
    ) -> ShardHits:
        """Top-k of this shard for ``queries [Q, D]`` in ``index_version``, with ``params`` for this call only.

        Raises:
            VersionNotLoadedError: this replica does not hold ``index_version``.
            BadRequestError: a setting the index does not have (e.g. ``nprobe`` on a flat index).
        """
        call = ShardCall(queries=queries, k=k, index_version=index_version, params=_search_params(params))
        with self._in_flight.hold(index_version):
            return self._host.search(self._shard, call)

    async def search_batched(
        self,
        queries: np.ndarray,
        k: int,
        index_version: str,
        params: SearchParams | Mapping[str, Any] | None = None,
    ) -> ShardHits:
        """`search`, gathered with concurrent calls into one Faiss call per (version, params) (``@serve.batch``)."""
        call = ShardCall(queries=queries, k=k, index_version=index_version, params=_search_params(params))
        with self._in_flight.hold(index_version):
            result: ShardHits = _raised(await self._search_batch(call))
            return result

    @serve.batch(max_batch_size=_DEFAULT_BATCH_SIZE, batch_wait_timeout_s=_DEFAULT_BATCH_WAIT_S)
    async def _search_batch(self, calls: list[ShardCall]) -> list[ShardHits | Exception]:
        # Off the event loop: Faiss releases the GIL, and the replica keeps gathering the next batch.
        return await asyncio.to_thread(self._host.search_calls, self._shard, calls)

    def search_calls(self, calls: list[ShardCall]) -> list[ShardHits | Exception]:
        """See `ShardHost.search_calls`."""
        return self._host.search_calls(self._shard, calls)

    def vector(self, item_id: int, index_version: str) -> np.ndarray | None:
        """The stored vector ``[D]`` of an id, or None when this shard does not hold it.

        None rather than an exception: an unknown id is an ordinary 404, not a replica error.
        """
        with self._in_flight.hold(index_version):
            return self._host.vector(self._shard, item_id, index_version)

    def item(self, item_id: int, index_version: str) -> dict[str, Any] | None:
        """The stored metadata of an id, or None when this shard does not hold it."""
        with self._in_flight.hold(index_version):
            return self._host.item(self._shard, item_id, index_version)

    def thumbnail(self, item_id: int, index_version: str) -> bytes | None:
        """The stored thumbnail (image file bytes) of an id, or None when there is none."""
        with self._in_flight.hold(index_version):
            return self._host.thumbnail(self._shard, item_id, index_version)


@serve.deployment
class EmbedderDeployment(VersionedReplica):
    """Embeds uploaded images, and texts for cross-modal models, with the model version that built the index.

    Holds one model per index version (an `EmbedderHost`).

    Args:
        spec: the serving spec; the first model comes from the manifest ``spec.index`` names.
        state_name: the application's swap-state actor; None outside Serve.
    """

    def __init__(self, *, spec: ServingSpec, state_name: str | None = None) -> None:
        self._spec = spec
        self._host = EmbedderHost(spec=spec)
        self._in_flight = InFlight()
        _configure_batch(self._embed_batch, spec)
        manifest, _ = read_manifest(_local_manifest(spec, spec.index))
        self._host.default_version = manifest.index_version
        self._init_versions(initial=IndexRef.of(manifest, spec.index), state_name=state_name)

    def prepare(self, manifest_ref: str) -> str:
        """Load the model of the version ``manifest_ref`` names (see `EmbedderHost.prepare`)."""
        return self._host.prepare(manifest_ref)

    def _held_versions(self) -> list[str]:
        return self._host.versions()

    def _load_version(self, ref: IndexRef) -> None:
        self._host.prepare(ref.manifest)

    def _drop_version(self, version: str) -> None:
        self._host.drop(version)

    def _follow(self, desired: Desired) -> None:
        super()._follow(desired)
        self._host.default_version = desired.active.index_version

    def loaded_versions(self) -> list[str]:
        """The index versions this replica holds a model for."""
        return self._host.versions()

    def embed(self, image_bytes: bytes, index_version: str | None = None) -> np.ndarray:
        """The embedding ``[D]`` float32 of an encoded image.

        Args:
            image_bytes: the image file's bytes.
            index_version: the version the caller pinned; default the application's active one.

        Raises:
            NotAnImageError: the bytes are not a readable image.
            VersionNotLoadedError: this replica holds no model for ``index_version``.
        """
        return self._embed_one(EmbedCall(kind="image", data=image_bytes, index_version=index_version))

    def embed_text(self, text: str, index_version: str | None = None) -> np.ndarray:
        """The embedding ``[D]`` float32 of a text (a ±1 code ``[bits]`` for a hashing model).

        Raises:
            BadRequestError: the model embeds images only.
            VersionNotLoadedError: this replica holds no model for ``index_version``.
        """
        return self._embed_one(EmbedCall(kind="text", data=text, index_version=index_version))

    async def embed_batched(self, image_bytes: bytes, index_version: str | None = None) -> np.ndarray:
        """`embed`, gathered with concurrent calls into one model call per version (``@serve.batch``)."""
        return await self._embed_one_batched(EmbedCall(kind="image", data=image_bytes, index_version=index_version))

    async def embed_text_batched(self, text: str, index_version: str | None = None) -> np.ndarray:
        """`embed_text`, gathered with concurrent calls into one model call per version (``@serve.batch``)."""
        return await self._embed_one_batched(EmbedCall(kind="text", data=text, index_version=index_version))

    def _embed_one(self, call: EmbedCall) -> np.ndarray:
        with self._in_flight.hold(self._host.version_of(call)):
            return self._host.embed(call)

    async def _embed_one_batched(self, call: EmbedCall) -> np.ndarray:
        with self._in_flight.hold(self._host.version_of(call)):
            result: np.ndarray = _raised(await self._embed_batch(call))
        return result

    @serve.batch(max_batch_size=_DEFAULT_BATCH_SIZE, batch_wait_timeout_s=_DEFAULT_BATCH_WAIT_S)
    async def _embed_batch(self, calls: list[EmbedCall]) -> list[np.ndarray | Exception]:
        return await asyncio.to_thread(self._host.embed_calls, calls)

    def embed_calls(self, calls: list[EmbedCall]) -> list[np.ndarray | Exception]:
        """See `EmbedderHost.embed_calls`."""
        return self._host.embed_calls(calls)


@serve.deployment
@serve.ingress()
class SearchIngress(VersionedReplica):
    """The HTTP entry point: validates, searches every shard (in-process or through handles), merges the top-k.

    The FastAPI app is built per replica by `__serve_build_asgi_app__` (Serve's late-bound
    ingress) from a `SearchService`, so the same app runs in-process in tests. It also runs
    rolling swaps (``POST /admin/swap``) and follows the active version.

    Args:
        spec: the serving spec; ``spec.index`` names the manifest served first.
        shards: one handle per shard deployment, in manifest order (distributed layout), or
            None to hold and search every shard in this replica (local layout).
        embedder: the embedder deployment's handle, or None to embed queries in this replica.
        state_name: the application's swap-state actor; None disables swaps.
    """

    def __init__(
        self,
        *,
        spec: ServingSpec,
        shards: list[DeploymentHandle] | None,
        embedder: DeploymentHandle | None,
        state_name: str | None = None,
    ) -> None:
        self._spec = spec
        self._manifests: dict[str, IndexManifest] = {}
        self._swaps: set[asyncio.Task[dict[str, Any]]] = set()
        manifest, _ = read_manifest(_local_manifest(spec, spec.index))
        self._shard_count = len(manifest.shards)
        self._shard_host = ShardHost(spec=spec) if shards is None else None
        self._embedder_host = EmbedderHost(spec=spec) if embedder is None else None
        # Faiss and torch release the GIL: one thread per shard searches a fan-out at once.
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(2, self._shard_count + 1), thread_name_prefix="local-shards"
        )
        shard_clients: list[ShardClient] = (
            [HandleShardClient(handle, batching=spec.batching) for handle in shards]
            if shards is not None
            else [LocalShardClient(self._shard_host, index, self._executor) for index in range(self._shard_count)]  # type: ignore[arg-type]
        )
        embedder_client: EmbedderClient = (
            HandleEmbedderClient(embedder, batching=spec.batching)
            if embedder is not None
            else LocalEmbedderClient(
                self._embedder_host,  # type: ignore[arg-type]
                self._executor,
                max_batch_size=spec.max_batch_size if spec.batching else 1,
                batch_wait_timeout_s=spec.batch_wait_timeout_s if spec.batching else 0.0,
            )
        )
        # Through ray.serve.metrics: every node's metrics agent exports every replica's series.
        self._service = SearchService(
            manifest=manifest,
            spec=spec,
            shards=shard_clients,
            embedder=embedder_client,
            metrics=ServingMetrics(RayServeSink()),
        )
        self._in_flight = self._service.in_flight
        self._init_versions(initial=IndexRef.of(manifest, spec.index), state_name=state_name)
        if state_name is not None and shards is not None:
            self._watch_task = asyncio.get_running_loop().create_task(self._watch_shards_forever())
        logger.info(
            "ingress serving index %s, %d shards (%s layout, embedder %s)",
            self._service.index_version,
            self._shard_count,
            self.layout,
            "local" if embedder is None else "deployment",
        )

    @property
    def layout(self) -> Literal["local", "distributed"]:
        return "local" if self._shard_host is not None else "distributed"

    async def _watch_shards_forever(self) -> None:
        """Mark a shard down in the service when Serve reports it without a running replica.

        Serve queues a call to a deployment that has no replica until one starts, so without
        this a request would wait for the whole deadline; marked down, the shard's requests fail
        fast (or answer partially) until the pool's probe reaches the replacement. Only a shard
        seen running before is marked, so replicas still starting with the app are not.
        """
        app_name = serve.get_replica_context().app_name
        names = {index: f"Shard{info.shard}" for index, info in enumerate(self._service.manifest.shards)}
        while True:
            await asyncio.sleep(SHARD_WATCH_INTERVAL_S)
            # Serve's status costs the controller and this replica real CPU (it was a tenth of
            # the ingress's under load when polled every tick): ask only about stalled shards.
            stalled = self._service.stalled_shards(after_s=SHARD_WATCH_INTERVAL_S)
            if not stalled:
                continue
            try:
                status = await asyncio.to_thread(serve.status)
                deployments = status.applications[app_name].deployments
                for index in stalled:
                    name = names[index]
                    states = deployments[name].replica_states if name in deployments else {}
                    if not sum(count for state, count in states.items() if state == "RUNNING"):
                        self._service.mark_shard_down(index, f"Serve reports no running replica of {name}")
            except asyncio.CancelledError:
                raise
            except Exception as error:
                logger.warning("cannot read Serve's status to watch the shards: %s", describe(error))

    def _held_versions(self) -> list[str]:
        return list(self._manifests)

    def _load_version(self, ref: IndexRef) -> None:
        """Read the version's manifest and load what this replica holds of it: all or nothing.

        Raises:
            SwapFailedError: the version has another shard count than the application.
            MemoryBudgetError, IndexIntegrityError, ModelNotFoundError: a local part cannot load.
        """
        manifest, _ = read_manifest(_local_manifest(self._spec, ref.manifest))
        if len(manifest.shards) != self._shard_count:
            raise SwapFailedError(
                f"index {manifest.index_version} has {len(manifest.shards)} shards but this application serves "
                f"{self._shard_count}; a different shard count needs a new deployment"
            )
        version = manifest.index_version
        try:
            if self._shard_host is not None:
                self._shard_host.prepare(ref.manifest)
            if self._embedder_host is not None:
                self._embedder_host.prepare(ref.manifest)
        except Exception:
            self._drop_local(version)
            raise
        self._manifests[version] = manifest

    def _drop_local(self, version: str) -> None:
        if self._shard_host is not None:
            self._shard_host.drop(version)
        if self._embedder_host is not None:
            self._embedder_host.drop(version)

    def _drop_version(self, version: str) -> None:
        if version == self._service.index_version:
            return
        self._manifests.pop(version, None)
        self._drop_local(version)

    def _follow(self, desired: Desired) -> None:
        super()._follow(desired)
        active = desired.active.index_version
        if active != self._service.index_version and active in self._manifests:
            self._service.activate(self._manifests[active])

    def _active(self) -> str | None:
        return self._service.index_version

    async def _expected_replicas(self) -> dict[str, int]:
        """Deployment -> running replicas, from Serve's status (the spec's counts if unavailable)."""
        fallback = {self._deployment: self._spec.ingress_replicas}
        if self._shard_host is None:
            fallback.update({f"Shard{shard}": self._spec.shard_replicas for shard in range(self._shard_count)})
        if self._embedder_host is None:
            fallback["Embedder"] = self._spec.embedder_replicas
        try:
            status = await asyncio.to_thread(serve.status)
            deployments = status.applications[serve.get_replica_context().app_name].deployments
            return {
                name: sum(count for state, count in info.replica_states.items() if state == "RUNNING")
                for name, info in deployments.items()
            }
        except Exception as error:
            logger.warning("cannot read Serve's status (%s); expecting the spec's replica counts", error)
            return fallback

    def _activate_ref(self, ref: IndexRef) -> None:
        self._service.activate(self._manifests[ref.index_version])

    async def swap(self, index: str) -> dict[str, Any]:
        """Run a rolling swap to the version ``index`` names (see `retrieval.serving.swap`).

        Raises:
            BadIndexReferenceError: ``index`` names no readable manifest.
            SwapInProgressError: another swap runs.
            SwapFailedError: the swap was refused or aborted; the old version keeps serving.
        """
        if self._state is None:
            raise SwapFailedError("this ingress runs without a swap state (not inside a Serve application)")
        location = await asyncio.to_thread(resolve_index_reference, index, served_manifest=self._spec.index)
        try:
            manifest, _ = await asyncio.to_thread(read_manifest, _local_manifest(self._spec, location))
        except IndexIntegrityError as error:
            raise BadIndexReferenceError(f"cannot swap to {index!r}: {error}") from None
        target = IndexRef.of(manifest, location)
        logger.info("swap requested to index %s (%s)", target.index_version, location)
        # A task of its own: a caller that disconnects (which cancels its request) must not leave
        # the swap half-done; it completes or rolls back either way (see `run_swap`).
        task = asyncio.get_running_loop().create_task(
            run_swap(
                state=ActorSwapState(self._state),
                target=target,
                expected_replicas=self._expected_replicas,
                activate=self._activate_ref,
                timeout_s=self._spec.swap_timeout_s,
                owner=f"{self._deployment} replica {self._replica}",
                metrics=self._service.metrics,
            )
        )
        self._swaps.add(task)
        task.add_done_callback(self._swaps.discard)
        return await asyncio.shield(task)

    async def abort(self) -> dict[str, Any]:
        """Abort the swap in progress before its flip, or roll it back after (see `SwapBook.roll_back`).

        Returns:
            The swap state afterwards (`status`).

        Raises:
            SwapFailedError: no swap is in progress, or this ingress runs without a swap state.
        """
        if self._state is None:
            raise SwapFailedError("this ingress runs without a swap state (not inside a Serve application)")
        await actor_call(self._state.roll_back, f"aborted by an operator through {self._deployment} {self._replica}")
        return await self.status()

    async def status(self) -> dict[str, Any]:
        """The swap state: active, prepared and retiring versions, every replica's state."""
        if self._state is None:
            return {"active": self._service.index_version, "prepared": None, "retiring": None, "replicas": {}}
        result: dict[str, Any] = await actor_call(self._state.status)
        return result

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_http_api(self._service, admin=self)

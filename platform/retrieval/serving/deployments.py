"""The Serve deployments: one per index shard, the embedder, and the HTTP ingress.

Every replica carries the index versions it holds and every call names the version it
wants (ARCHITECTURE invariant 1): a replica asked for a version it does not hold raises
`VersionNotLoadedError`, which the ingress retries, and never answers from another version.

Rolling swap (the protocol is in `retrieval.serving.swap`): a Serve handle call reaches ONE
replica, so the versions every replica must hold live in a small named Ray actor per
application (`SwapStateActor`, holding a `SwapBook`). Each replica reads it in its constructor
(so a restarted or added replica starts on the right versions, before it takes traffic) and
then polls it from a background asyncio task a few times a second, reporting what it holds,
what failed to load and, for the ingress, which version it answers with and how many requests
are in flight per version. The ingress replica that receives ``POST /admin/swap`` runs the swap
(`retrieval.serving.swap.run_swap`) against that actor and Serve's replica counts.

The state actor is detached (it must outlive the replicas, which come and go) and holds no
index data; `delete_swap_state` removes it after the application is deleted. If it dies, every
replica keeps serving what it holds; the next poll re-creates it from the active version the
replica last saw.

Memory: while a swap runs each shard replica holds two versions of its own shard (see
`retrieval.serving.swap.check_shard_memory`, which refuses a version that would not fit).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import uuid
from typing import Any

import numpy as np
import ray
from fastapi import FastAPI
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle

from retrieval.config import ServingSpec
from retrieval.errors import IndexIntegrityError, RetrievalError
from retrieval.index.manifest import IndexManifest, read_manifest
from retrieval.index.object_store import local_index_path
from retrieval.index.shards import LoadedShard, load_shard
from retrieval.serving.errors import BadIndexReferenceError, SwapFailedError, VersionNotLoadedError
from retrieval.serving.http import build_http_api
from retrieval.serving.images import decode_image
from retrieval.serving.service import SearchService
from retrieval.serving.swap import (
    Desired,
    IndexRef,
    InFlight,
    ReplicaReport,
    SwapBook,
    check_shard_memory,
    resolve_index_reference,
    run_swap,
    shard_file_bytes,
)

logger = logging.getLogger(__name__)

SWAP_NAMESPACE = "retrieval-serving"
# How often a replica polls the swap state: the delay before an idle replica starts loading a
# prepared version, and before a second ingress replica follows a flip.
POLL_INTERVAL_S = 0.2
# How long a replica waits for requests in flight on a version it is asked to free.
RELEASE_DRAIN_S = 30.0
# A replica silent for longer is taken as gone; a large shard's load blocks its polls.
STALE_AFTER_S = 30.0
_STATE_TIMEOUT_S = 60.0


def new_swap_state_name() -> str:
    """A fresh name for an application's swap-state actor (one per `build_app` call)."""
    return f"swap-state-{uuid.uuid4().hex[:12]}"


@ray.remote(num_cpus=0, max_restarts=0)
class SwapStateActor:
    """The shared `SwapBook` of one application, as a named detached Ray actor."""

    def __init__(self, initial: IndexRef) -> None:
        self._book = SwapBook(initial=initial, stale_after_s=STALE_AFTER_S)

    def report(self, report: ReplicaReport) -> Desired:
        return self._book.report(report)

    def desired(self) -> Desired:
        return self._book.desired()

    def begin(self, target: IndexRef) -> Desired:
        return self._book.begin(target)

    def flip(self) -> Desired:
        return self._book.flip()

    def finish(self) -> Desired:
        return self._book.finish()

    def abort(self) -> Desired:
        return self._book.abort()

    def live_reports(self) -> list[ReplicaReport]:
        return self._book.live_reports()

    def status(self) -> dict[str, Any]:
        return self._book.status()


def swap_state_actor(name: str, *, initial: IndexRef) -> Any:
    """The application's swap-state actor, created with ``initial`` active if it does not exist yet."""
    return SwapStateActor.options(  # type: ignore[attr-defined]
        name=name, namespace=SWAP_NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote(initial)


def delete_swap_state(name: str) -> bool:
    """Kill an application's swap-state actor (after `serve.delete`); False if there is none."""
    try:
        actor = ray.get_actor(name, namespace=SWAP_NAMESPACE)
    except ValueError:
        return False
    ray.kill(actor)
    return True


def _platform_error(error: RayTaskError) -> BaseException:
    """The platform error a remote call raised, or the Ray error itself."""
    return error.cause if isinstance(error.cause, RetrievalError) else error


async def _actor_call(method: Any, *args: Any) -> Any:
    try:
        return await method.remote(*args)
    except RayTaskError as error:
        raise _platform_error(error) from None


class ActorSwapState:
    """`retrieval.serving.swap.SwapState` over a `SwapStateActor` handle."""

    def __init__(self, actor: Any) -> None:
        self._actor = actor

    async def begin(self, target: IndexRef) -> Desired:
        result: Desired = await _actor_call(self._actor.begin, target)
        return result

    async def flip(self) -> Desired:
        result: Desired = await _actor_call(self._actor.flip)
        return result

    async def finish(self) -> Desired:
        result: Desired = await _actor_call(self._actor.finish)
        return result

    async def abort(self) -> Desired:
        result: Desired = await _actor_call(self._actor.abort)
        return result

    async def live_reports(self) -> list[ReplicaReport]:
        result: list[ReplicaReport] = await _actor_call(self._actor.live_reports)
        return result


def _get_off_loop(ref: Any) -> Any:
    """``ray.get`` from a helper thread: on the event loop's own thread it warns (and blocks it)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(ray.get, ref, timeout=_STATE_TIMEOUT_S).result()


def _describe(error: BaseException) -> str:
    return str(error) if isinstance(error, RetrievalError) else f"{type(error).__name__}: {error}"


class VersionedReplica:
    """What every replica shares: the versions it holds follow the application's swap state.

    Subclasses implement `_held_versions`, `_load_version` (blocking; raise a clear error when
    the version cannot be served) and `_drop_version`, and may override `_follow` and `_active`.
    """

    _in_flight: InFlight

    def _held_versions(self) -> list[str]:
        raise NotImplementedError

    def _load_version(self, ref: IndexRef) -> None:
        raise NotImplementedError

    def _drop_version(self, version: str) -> None:
        raise NotImplementedError

    def _follow(self, desired: Desired) -> None:
        """Act on the desired active version (the ingress switches to it; others keep it for defaults)."""
        self._desired_active = desired.active.index_version

    def _active(self) -> str | None:
        """The version this replica answers with by itself (ingress only)."""
        return None

    def _init_versions(self, *, initial: IndexRef, state_name: str | None) -> None:
        """Load the versions to serve, then (inside Serve) follow the swap state in the background.

        Called from a constructor: in Serve it runs on the replica's event loop before the
        replica takes traffic, so blocking here delays only this replica's start.
        """
        self._errors: dict[str, str] = {}
        self._epoch = -1
        self._desired_active = initial.index_version
        self._state: Any = None
        self._state_name = state_name
        if state_name is None:
            self._load_version(initial)
            return
        context = serve.get_replica_context()
        self._replica = context.replica_id.unique_id
        self._deployment = context.deployment
        self._last_desired = Desired(epoch=-1, active=initial)
        self._state = swap_state_actor(state_name, initial=initial)
        desired: Desired = _get_off_loop(self._state.report.remote(self._report()))
        for version, ref in desired.wanted().items():
            try:
                self._load_version(ref)
            except Exception as error:
                self._errors[version] = _describe(error)
                logger.error("%s: cannot load index %s: %s", self._deployment, version, self._errors[version])
        if desired.active.index_version not in self._held_versions():
            raise IndexIntegrityError(
                f"{self._deployment}: cannot serve the active index {desired.active.index_version}: "
                f"{self._errors.get(desired.active.index_version)}"
            )
        self._follow(desired)
        self._epoch = desired.epoch
        self._last_desired = desired
        self._sync_task = asyncio.get_running_loop().create_task(self._sync_forever())

    def _report(self) -> ReplicaReport:
        return ReplicaReport(
            replica=self._replica,
            deployment=self._deployment,
            holds=tuple(sorted(self._held_versions())),
            errors=dict(self._errors),
            active=self._active(),
            in_flight=self._in_flight.snapshot(),
            epoch=self._epoch,
        )

    async def _sync_forever(self) -> None:
        while True:
            try:
                desired = await self._state.report.remote(self._report())
                changed = await self._apply(desired)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                # The state actor may be gone: keep serving what is held, and re-create it
                # from the last desired state this replica saw.
                logger.warning("%s: swap state unreachable (%s); serving what is held", self._deployment, error)
                try:
                    self._state = swap_state_actor(self._state_name or "", initial=self._last_desired.active)
                except Exception as reconnect_error:
                    logger.warning("%s: cannot re-create the swap state: %s", self._deployment, reconnect_error)
                changed = False
            if not changed:
                await asyncio.sleep(POLL_INTERVAL_S)

    async def _apply(self, desired: Desired) -> bool:
        """Load what ``desired`` adds, free what it drops; True if anything changed."""
        wanted = desired.wanted()
        changed = False
        for version in [version for version in self._errors if version not in wanted]:
            del self._errors[version]
        for version, ref in wanted.items():
            if version in self._held_versions() or version in self._errors:
                continue
            try:
                await asyncio.to_thread(self._load_version, ref)
                logger.info("%s: loaded index %s", self._deployment, version)
            except Exception as error:
                self._errors[version] = _describe(error)
                logger.error("%s: cannot load index %s: %s", self._deployment, version, self._errors[version])
            changed = True
        self._follow(desired)
        for version in [version for version in self._held_versions() if version not in wanted]:
            if not await self._in_flight.drained(version, timeout_s=RELEASE_DRAIN_S):
                logger.warning("%s: freeing index %s with requests still in flight", self._deployment, version)
            self._drop_version(version)
            logger.info("%s: freed index %s", self._deployment, version)
            changed = True
        changed = changed or desired.epoch != self._epoch
        self._epoch = desired.epoch
        self._last_desired = desired
        return changed

    async def release(self, version: str, timeout_s: float = RELEASE_DRAIN_S) -> bool:
        """Free ``version`` once its requests in flight have drained (at most ``timeout_s``).

        Returns:
            Whether it drained in time (it is freed either way).
        """
        drained = await self._in_flight.drained(version, timeout_s=timeout_s)
        if version in self._held_versions():
            self._drop_version(version)
        return drained


@serve.deployment
class ShardDeployment(VersionedReplica):
    """Serves one shard of the index, verified against its manifest checksums on load.

    Holds one version, or two during a rolling swap.

    Args:
        spec: the serving spec; ``spec.index`` names the manifest to load first (an ``s3://``
            one is fetched into the node's cache, this shard's files only).
        shard: the shard number in the manifest.
        state_name: the application's swap-state actor; None outside Serve (one fixed version).
    """

    def __init__(self, *, spec: ServingSpec, shard: int, state_name: str | None = None) -> None:
        self._spec = spec
        self._shard = shard
        self._versions: dict[str, LoadedShard] = {}
        self._bytes: dict[str, int] = {}
        self._in_flight = InFlight()
        manifest, _ = read_manifest(self._local(spec.index))
        self._init_versions(initial=IndexRef.of(manifest, spec.index), state_name=state_name)

    def _local(self, manifest_ref: str) -> Any:
        return local_index_path(
            manifest_ref, endpoint_url=self._spec.endpoint_url, cache_dir=self._spec.cache_dir, shards=[self._shard]
        )

    def prepare(self, manifest_ref: str) -> str:
        """Load the version ``manifest_ref`` names beside the ones held.

        The memory budget is checked before anything is read into memory, then the files'
        checksums; on any error nothing held changes.

        Args:
            manifest_ref: a local ``manifest.json`` path or ``s3://.../manifest.json`` URI.

        Returns:
            The loaded index version.

        Raises:
            MemoryBudgetError: the shard would not fit beside the ones held.
            IndexIntegrityError: a missing or corrupt file, a checksum mismatch, no such shard.
        """
        manifest, version_dir = read_manifest(self._local(manifest_ref))
        version = manifest.index_version
        if version in self._versions:
            return version
        new_bytes = shard_file_bytes(manifest, version_dir, self._shard)
        check_shard_memory(
            shard=self._shard,
            index_version=version,
            new_bytes=new_bytes,
            held_bytes=sum(self._bytes.values()),
            budget_bytes=self._spec.shard_memory_bytes,
        )
        loaded = load_shard(manifest=manifest, version_dir=version_dir, shard=self._shard)
        self._bytes[version] = new_bytes
        self._versions[version] = loaded
        return version

    def _held_versions(self) -> list[str]:
        return list(self._versions)

    def _load_version(self, ref: IndexRef) -> None:
        self.prepare(ref.manifest)

    def _drop_version(self, version: str) -> None:
        self._versions.pop(version, None)
        self._bytes.pop(version, None)

    def loaded_versions(self) -> list[str]:
        """The index versions this replica holds."""
        return sorted(self._versions)

    def _loaded(self, index_version: str) -> LoadedShard:
        loaded = self._versions.get(index_version)
        if loaded is None:
            raise VersionNotLoadedError(
                f"shard {self._shard} does not hold index version {index_version} (it holds {self.loaded_versions()})"
            )
        return loaded

    def search(self, queries: np.ndarray, k: int, index_version: str) -> dict[str, Any]:
        """Top-k of this shard for ``queries [Q, D]`` in ``index_version``.

        Returns:
            ``{"index_version", "shard", "scores" [Q, k], "ids" [Q, k] (-1 = padding),
            "items": {id: metadata} for every returned id}``.

        Raises:
            VersionNotLoadedError: this replica does not hold ``index_version``.
        """
        with self._in_flight.hold(index_version):
            loaded = self._loaded(index_version)
            scores, ids = loaded.search(queries, k)
            # The metadata travels with the scores, so the ingress needs no second round trip.
            items = {item_id: loaded.items[item_id] for item_id in np.unique(ids).tolist() if item_id >= 0}
        return {"index_version": index_version, "shard": self._shard, "scores": scores, "ids": ids, "items": items}

    def vector(self, item_id: int, index_version: str) -> np.ndarray | None:
        """The stored vector ``[D]`` of an id, or None when this shard does not hold it.

        None rather than an exception: an unknown id is an ordinary 404, not a replica error.
        """
        with self._in_flight.hold(index_version):
            loaded = self._loaded(index_version)
            return loaded.vector(item_id) if item_id in loaded.items else None

    def item(self, item_id: int, index_version: str) -> dict[str, Any] | None:
        """The stored metadata of an id, or None when this shard does not hold it."""
        with self._in_flight.hold(index_version):
            return self._loaded(index_version).items.get(item_id)


@serve.deployment
class EmbedderDeployment(VersionedReplica):
    """Embeds uploaded images, and texts for cross-modal models, with the model version that built the index.

    Holds one model per index version (one object when two versions share a model URI).

    Args:
        spec: the serving spec; the first model comes from the manifest ``spec.index`` names.
        state_name: the application's swap-state actor; None outside Serve.
    """

    def __init__(self, *, spec: ServingSpec, state_name: str | None = None) -> None:
        self._spec = spec
        self._models: dict[str, tuple[str, Any]] = {}
        self._in_flight = InFlight()
        manifest, _ = read_manifest(self._local(spec.index))
        self._init_versions(initial=IndexRef.of(manifest, spec.index), state_name=state_name)

    def _local(self, manifest_ref: str) -> Any:
        return local_index_path(
            manifest_ref, endpoint_url=self._spec.endpoint_url, cache_dir=self._spec.cache_dir, shards=()
        )

    def prepare(self, manifest_ref: str) -> str:
        """Load the model of the version ``manifest_ref`` names, beside the ones held.

        Returns:
            The index version.

        Raises:
            ModelNotFoundError: the manifest's model cannot be loaded.
            IndexIntegrityError: the model's dimension differs from the index's, or a binary
                index's model is not a hashing one (or its code length differs).
        """
        # Imported here, not at module level: it pulls in torch and MLflow, which the shard
        # and ingress replicas (same module) must not pay for in memory and start-up time.
        from retrieval.tracking.registry import load_embedder

        manifest, _ = read_manifest(self._local(manifest_ref))
        version, uri = manifest.index_version, manifest.model.uri
        if version in self._models:
            return version
        shared = next((embedder for held_uri, embedder in self._models.values() if held_uri == uri), None)
        embedder = shared if shared is not None else load_embedder(uri, tracking_uri=self._spec.tracking_uri)
        if manifest.is_binary and embedder.code_bits != manifest.bits:
            raise IndexIntegrityError(
                f"index {version} holds {manifest.bits}-bit hash codes but model {uri} gives "
                f"{'real-valued embeddings' if embedder.code_bits is None else f'{embedder.code_bits}-bit codes'}"
            )
        if not manifest.is_binary and embedder.dim != manifest.dim:
            raise IndexIntegrityError(
                f"model {uri} embeds into {embedder.dim} dimensions but index {version} holds "
                f"{manifest.dim}-dimensional vectors"
            )
        self._models[version] = (uri, embedder)
        logger.info("embedder for index %s loaded %s", version, uri)
        return version

    def _held_versions(self) -> list[str]:
        return list(self._models)

    def _load_version(self, ref: IndexRef) -> None:
        self.prepare(ref.manifest)

    def _drop_version(self, version: str) -> None:
        self._models.pop(version, None)

    def embed(self, image_bytes: bytes, index_version: str | None = None) -> np.ndarray:
        """The embedding ``[D]`` float32 of an encoded image.

        Args:
            image_bytes: the image file's bytes (any format Pillow reads).
            index_version: the version the caller pinned; default the application's active one.

        Raises:
            NotAnImageError: the bytes are not a readable image.
            VersionNotLoadedError: this replica holds no model for ``index_version``.
        """
        version = index_version if index_version is not None else self._desired_active
        with self._in_flight.hold(version):
            held = self._models.get(version)
            if held is None:
                raise VersionNotLoadedError(f"the embedder holds index versions {sorted(self._models)}, not {version}")
            image = decode_image(image_bytes)
            return np.asarray(held[1].embed_images([image])[0], dtype=np.float32)

    def embed_text(self, text: str, index_version: str | None = None) -> np.ndarray:
        """The embedding ``[D]`` float32 of a text (a ±1 code ``[bits]`` for a hashing model).

        Args:
            text: the query sentence; the model's text encoder cuts an over-long one.
            index_version: the version the caller pinned; default the application's active one.

        Raises:
            BadRequestError: the model embeds images only.
            VersionNotLoadedError: this replica holds no model for ``index_version``.
        """
        version = index_version if index_version is not None else self._desired_active
        with self._in_flight.hold(version):
            held = self._models.get(version)
            if held is None:
                raise VersionNotLoadedError(f"the embedder holds index versions {sorted(self._models)}, not {version}")
            return np.asarray(held[1].embed_texts([text])[0], dtype=np.float32)


async def _call(method: Any, *args: Any) -> Any:
    """Await a deployment call, re-raising the platform's own errors as themselves.

    Serve wraps a replica's exception in a `RayTaskError` whose text carries the remote
    traceback; the HTTP layer wants the original error and its plain message.
    """
    try:
        return await method.remote(*args)
    except RayTaskError as error:
        if isinstance(error.cause, RetrievalError):
            raise error.cause from None
        raise


class HandleShardClient:
    """`ShardClient` over a `ShardDeployment` handle."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self._handle = handle

    async def search(self, queries: np.ndarray, k: int, index_version: str) -> dict[str, Any]:
        return dict(await _call(self._handle.search, queries, k, index_version))

    async def vector(self, item_id: int, index_version: str) -> np.ndarray | None:
        result: np.ndarray | None = await _call(self._handle.vector, item_id, index_version)
        return result

    async def item(self, item_id: int, index_version: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = await _call(self._handle.item, item_id, index_version)
        return result


class HandleEmbedderClient:
    """`EmbedderClient` over an `EmbedderDeployment` handle."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self._handle = handle

    async def embed(self, image_bytes: bytes, index_version: str) -> np.ndarray:
        return np.asarray(await _call(self._handle.embed, image_bytes, index_version))

    async def embed_text(self, text: str, index_version: str) -> np.ndarray:
        return np.asarray(await _call(self._handle.embed_text, text, index_version))


@serve.deployment
@serve.ingress()
class SearchIngress(VersionedReplica):
    """The HTTP entry point: validates, fans out to every shard, merges the exact top-k.

    The FastAPI app is built per replica by `__serve_build_asgi_app__` (Serve's late-bound
    ingress) from a `SearchService`, so the same app runs in-process in tests. Inside Serve it
    also runs rolling swaps (``POST /admin/swap``) and follows the active version.

    Args:
        spec: the serving spec; ``spec.index`` names the manifest served first.
        shards: one handle per shard deployment, in manifest order.
        embedder: the embedder deployment's handle.
        state_name: the application's swap-state actor; None disables swaps.
    """

    def __init__(
        self,
        *,
        spec: ServingSpec,
        shards: list[DeploymentHandle],
        embedder: DeploymentHandle,
        state_name: str | None = None,
    ) -> None:
        self._spec = spec
        self._shard_count = len(shards)
        self._manifests: dict[str, IndexManifest] = {}
        manifest, _ = read_manifest(self._local(spec.index))
        self._service = SearchService(
            manifest=manifest,
            spec=spec,
            shards=[HandleShardClient(handle) for handle in shards],
            embedder=HandleEmbedderClient(embedder),
        )
        self._in_flight = self._service.in_flight
        self._init_versions(initial=IndexRef.of(manifest, spec.index), state_name=state_name)
        logger.info("ingress serving index %s, %d shards", self._service.index_version, len(shards))

    def _local(self, manifest_ref: str) -> Any:
        return local_index_path(
            manifest_ref, endpoint_url=self._spec.endpoint_url, cache_dir=self._spec.cache_dir, shards=()
        )

    def _held_versions(self) -> list[str]:
        return list(self._manifests)

    def _load_version(self, ref: IndexRef) -> None:
        manifest, _ = read_manifest(self._local(ref.manifest))
        if len(manifest.shards) != self._shard_count:
            raise SwapFailedError(
                f"index {manifest.index_version} has {len(manifest.shards)} shards but this application serves "
                f"{self._shard_count}; a different shard count needs a new deployment"
            )
        self._manifests[manifest.index_version] = manifest

    def _drop_version(self, version: str) -> None:
        if version != self._service.index_version:
            self._manifests.pop(version, None)

    def _follow(self, desired: Desired) -> None:
        super()._follow(desired)
        active = desired.active.index_version
        if active != self._service.index_version and active in self._manifests:
            self._service.activate(self._manifests[active])

    def _active(self) -> str | None:
        return self._service.index_version

    async def _expected_replicas(self) -> dict[str, int]:
        """Deployment -> running replicas, from Serve's status (the spec's counts if unavailable)."""
        fallback = {f"Shard{shard}": self._spec.shard_replicas for shard in range(self._shard_count)}
        fallback.update({"Embedder": self._spec.embedder_replicas, self._deployment: 1})
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
        location = resolve_index_reference(index, served_manifest=self._spec.index)
        try:
            manifest, _ = await asyncio.to_thread(read_manifest, self._local(location))
        except IndexIntegrityError as error:
            raise BadIndexReferenceError(f"cannot swap to {index!r}: {error}") from None
        target = IndexRef.of(manifest, location)
        logger.info("swap requested to index %s (%s)", target.index_version, location)
        return await run_swap(
            state=ActorSwapState(self._state),
            target=target,
            expected_replicas=self._expected_replicas,
            activate=self._activate_ref,
            timeout_s=self._spec.swap_timeout_s,
        )

    async def status(self) -> dict[str, Any]:
        """The swap state: active, prepared and retiring versions, every replica's state."""
        if self._state is None:
            return {"active": self._service.index_version, "prepared": None, "retiring": None, "replicas": {}}
        result: dict[str, Any] = await _actor_call(self._state.status)
        return result

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_http_api(self._service, admin=self)

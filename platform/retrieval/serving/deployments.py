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

Batching (``spec.batching``): the shards and the embedder gather concurrent calls with
``@serve.batch`` (``max_batch_size`` calls, ``batch_wait_timeout_s``, from the spec) and answer
each group of equal (version, search parameters) with ONE Faiss or model call; every deployment
has one core method over a list of calls and two thin entry points, the plain per-call one
(``search``, ``embed``, ``embed_text``) and the batched one (``*_batched``), which the ingress's
handle clients choose by the spec. A replica that died or sheds load surfaces at the ingress as
`ShardUnavailableError` (see `retrieval.serving.service` for the retry and the deadlines).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import ray
from fastapi import FastAPI
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from retrieval.config import ServingSpec
from retrieval.errors import IndexIntegrityError, RetrievalError
from retrieval.index.manifest import IndexManifest, read_manifest
from retrieval.index.object_store import local_index_path
from retrieval.index.search_params import SearchParams
from retrieval.index.shards import LoadedShard, load_shard
from retrieval.serving.errors import (
    BadIndexReferenceError,
    ShardUnavailableError,
    SwapFailedError,
    VersionNotLoadedError,
)
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
# How often the ingress checks for stalled shard calls, and the stall that makes it ask Serve about a shard.
SHARD_WATCH_INTERVAL_S = 0.5
# Errors of a handle call that mean no replica could answer it: it died (or its node is
# unreachable), Serve sheds load, or the deployment failed to deploy. The call may succeed on
# another replica, so the ingress retries it once before counting the shard as missing.
_REPLICA_GONE: tuple[type[BaseException], ...] = (
    RayActorError,
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)
# `@serve.batch` defaults; each replica applies its spec's values in its constructor.
_DEFAULT_BATCH_SIZE = 32
_DEFAULT_BATCH_WAIT_S = 0.002


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


@dataclass(frozen=True)
class ShardCall:
    """One call of `ShardDeployment.search`: ``queries [q, D]``, ``k`` results each, in one version with one setting."""

    queries: np.ndarray
    k: int
    index_version: str
    params: SearchParams


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
        _configure_batch(self._search_batch, spec)
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
        loaded = load_shard(manifest=manifest, version_dir=version_dir, shard=self._shard, mmap=self._spec.mmap_shards)
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

    def search(
        self,
        queries: np.ndarray,
        k: int,
        index_version: str,
        params: SearchParams | Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Top-k of this shard for ``queries [Q, D]`` in ``index_version``, with ``params`` for this call only.

        Returns:
            ``{"index_version", "shard", "scores" [Q, k], "ids" [Q, k] (-1 = padding),
            "items": {id: metadata} for every returned id}``.

        Raises:
            VersionNotLoadedError: this replica does not hold ``index_version``.
            BadRequestError: a setting the index does not have (e.g. ``nprobe`` on a flat index).
        """
        call = ShardCall(queries=queries, k=k, index_version=index_version, params=_search_params(params))
        with self._in_flight.hold(index_version):
            return dict(_raised(self.search_calls([call])[0]))

    async def search_batched(
        self,
        queries: np.ndarray,
        k: int,
        index_version: str,
        params: SearchParams | Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """`search`, gathered with concurrent calls into one Faiss call per (version, params) (``@serve.batch``)."""
        call = ShardCall(queries=queries, k=k, index_version=index_version, params=_search_params(params))
        with self._in_flight.hold(index_version):
            return dict(_raised(await self._search_batch(call)))

    @serve.batch(max_batch_size=_DEFAULT_BATCH_SIZE, batch_wait_timeout_s=_DEFAULT_BATCH_WAIT_S)
    async def _search_batch(self, calls: list[ShardCall]) -> list[dict[str, Any] | Exception]:
        # Off the event loop: Faiss releases the GIL, and the replica keeps gathering the next batch.
        return await asyncio.to_thread(self.search_calls, calls)

    def search_calls(self, calls: Sequence[ShardCall]) -> list[dict[str, Any] | Exception]:
        """Answer several calls, one Faiss search per group of equal (version, params) with the group's largest k.

        Returns:
            One `search` reply per call, in order, each cut to its own k; a group's error (a
            version not held, a setting the index does not have) in place of each of its replies.
        """
        groups: dict[tuple[str, tuple[int | None, int | None]], list[int]] = {}
        for position, call in enumerate(calls):
            groups.setdefault((call.index_version, call.params.key()), []).append(position)
        results: list[dict[str, Any] | Exception] = [RuntimeError("unanswered")] * len(calls)
        for (version, _), positions in groups.items():
            members = [calls[position] for position in positions]
            try:
                loaded = self._loaded(version)
                stacked = np.concatenate([call.queries for call in members])
                fetch = max(call.k for call in members)
                scores, ids = loaded.search(stacked, fetch, members[0].params)
            except Exception as error:
                for position in positions:
                    results[position] = error
                continue
            row = 0
            for position, call in zip(positions, members, strict=True):
                rows = slice(row, row + len(call.queries))
                row += len(call.queries)
                results[position] = self._reply(loaded, version, scores[rows, : call.k], ids[rows, : call.k])
        return results

    def _reply(self, loaded: LoadedShard, version: str, scores: np.ndarray, ids: np.ndarray) -> dict[str, Any]:
        # The metadata travels with the scores, so the ingress needs no second round trip.
        items = loaded.items.get_many(ids.ravel().tolist())
        return {
            "index_version": version,
            "shard": self._shard,
            "scores": np.ascontiguousarray(scores),
            "ids": np.ascontiguousarray(ids),
            "items": items,
        }

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

    def thumbnail(self, item_id: int, index_version: str) -> bytes | None:
        """The stored thumbnail (image file bytes) of an id, or None when there is none."""
        with self._in_flight.hold(index_version):
            return self._loaded(index_version).items.thumbnail(item_id)


@dataclass(frozen=True)
class EmbedCall:
    """One call of the embedder: an encoded image or a text, for one version (None: the active one)."""

    kind: Literal["image", "text"]
    data: bytes | str
    index_version: str | None


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
        _configure_batch(self._embed_batch, spec)
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

    def loaded_versions(self) -> list[str]:
        """The index versions this replica holds a model for."""
        return sorted(self._models)

    def embed(self, image_bytes: bytes, index_version: str | None = None) -> np.ndarray:
        """The embedding ``[D]`` float32 of an encoded image.

        Args:
            image_bytes: the image file's bytes (any format Pillow reads).
            index_version: the version the caller pinned; default the application's active one.

        Raises:
            NotAnImageError: the bytes are not a readable image.
            VersionNotLoadedError: this replica holds no model for ``index_version``.
        """
        return self._embed_one(EmbedCall(kind="image", data=image_bytes, index_version=index_version))

    def embed_text(self, text: str, index_version: str | None = None) -> np.ndarray:
        """The embedding ``[D]`` float32 of a text (a ±1 code ``[bits]`` for a hashing model).

        Args:
            text: the query sentence; the model's text encoder cuts an over-long one.
            index_version: the version the caller pinned; default the application's active one.

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

    def _version_of(self, call: EmbedCall) -> str:
        return call.index_version if call.index_version is not None else self._desired_active

    def _embed_one(self, call: EmbedCall) -> np.ndarray:
        with self._in_flight.hold(self._version_of(call)):
            result: np.ndarray = _raised(self.embed_calls([call])[0])
        return result

    async def _embed_one_batched(self, call: EmbedCall) -> np.ndarray:
        with self._in_flight.hold(self._version_of(call)):
            result: np.ndarray = _raised(await self._embed_batch(call))
        return result

    @serve.batch(max_batch_size=_DEFAULT_BATCH_SIZE, batch_wait_timeout_s=_DEFAULT_BATCH_WAIT_S)
    async def _embed_batch(self, calls: list[EmbedCall]) -> list[np.ndarray | Exception]:
        return await asyncio.to_thread(self.embed_calls, calls)

    def embed_calls(self, calls: Sequence[EmbedCall]) -> list[np.ndarray | Exception]:
        """Embed several calls with one model call per (kind, version).

        Returns:
            One embedding ``[D]`` float32 per call, in order; an error in place of a call's
            embedding (an unreadable image fails alone, a version not held or a model without a
            text encoder fails its whole group).
        """
        results: list[np.ndarray | Exception] = [RuntimeError("unanswered")] * len(calls)
        groups: dict[tuple[str, str], list[int]] = {}
        for position, call in enumerate(calls):
            groups.setdefault((call.kind, self._version_of(call)), []).append(position)
        for (kind, version), positions in groups.items():
            held = self._models.get(version)
            if held is None:
                error = VersionNotLoadedError(
                    f"the embedder holds index versions {sorted(self._models)}, not {version}"
                )
                for position in positions:
                    results[position] = error
                continue
            inputs: list[Any] = []
            ready: list[int] = []
            for position in positions:
                data = calls[position].data
                try:
                    # An image call carries bytes, a text call a str (`EmbedCall`).
                    inputs.append(decode_image(data) if isinstance(data, bytes) else data)
                    ready.append(position)
                except Exception as error:
                    results[position] = error
            if not inputs:
                continue
            try:
                embedded = held[1].embed_images(inputs) if kind == "image" else held[1].embed_texts(inputs)
            except Exception as error:
                for position in ready:
                    results[position] = error
                continue
            for position, row in zip(ready, np.asarray(embedded, dtype=np.float32), strict=True):
                results[position] = row
        return results


async def _call(method: Any, *args: Any) -> Any:
    """Await a deployment call, re-raising the platform's own errors as themselves.

    Serve wraps a replica's exception in a `RayTaskError` whose text carries the remote
    traceback; the HTTP layer wants the original error and its plain message. A call no replica
    could answer (`_REPLICA_GONE`) raises `ShardUnavailableError`; a call whose caller gave up
    (the request's deadline) is cancelled at the replica too.

    Raises:
        ShardUnavailableError: the replica died or is unreachable, or Serve shed the call.
    """
    response = method.remote(*args)
    try:
        return await response
    except RayTaskError as error:
        if isinstance(error.cause, RetrievalError):
            raise error.cause from None
        raise
    except _REPLICA_GONE as error:
        summary = (str(error).strip().splitlines() or [""])[0][:200]
        raise ShardUnavailableError(f"{type(error).__name__}: {summary}") from None
    except asyncio.CancelledError:
        response.cancel()
        raise


class HandleShardClient:
    """`ShardClient` over a `ShardDeployment` handle; ``batching`` picks the ``@serve.batch`` entry point."""

    def __init__(self, handle: DeploymentHandle, *, batching: bool = False) -> None:
        self._handle = handle
        self._batching = batching

    async def search(
        self, queries: np.ndarray, k: int, index_version: str, params: SearchParams | None = None
    ) -> dict[str, Any]:
        method = self._handle.search_batched if self._batching else self._handle.search
        return dict(await _call(method, queries, k, index_version, params))

    async def vector(self, item_id: int, index_version: str) -> np.ndarray | None:
        result: np.ndarray | None = await _call(self._handle.vector, item_id, index_version)
        return result

    async def item(self, item_id: int, index_version: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = await _call(self._handle.item, item_id, index_version)
        return result

    async def thumbnail(self, item_id: int, index_version: str) -> bytes | None:
        result: bytes | None = await _call(self._handle.thumbnail, item_id, index_version)
        return result

    async def loaded_versions(self) -> list[str]:
        return list(await _call(self._handle.loaded_versions))


class HandleEmbedderClient:
    """`EmbedderClient` over an `EmbedderDeployment` handle; ``batching`` picks the ``@serve.batch`` entry points."""

    def __init__(self, handle: DeploymentHandle, *, batching: bool = False) -> None:
        self._handle = handle
        self._batching = batching

    async def embed(self, image_bytes: bytes, index_version: str) -> np.ndarray:
        method = self._handle.embed_batched if self._batching else self._handle.embed
        return np.asarray(await _call(method, image_bytes, index_version))

    async def embed_text(self, text: str, index_version: str) -> np.ndarray:
        method = self._handle.embed_text_batched if self._batching else self._handle.embed_text
        return np.asarray(await _call(method, text, index_version))

    async def loaded_versions(self) -> list[str]:
        return list(await _call(self._handle.loaded_versions))


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
            shards=[HandleShardClient(handle, batching=spec.batching) for handle in shards],
            embedder=HandleEmbedderClient(embedder, batching=spec.batching),
        )
        self._in_flight = self._service.in_flight
        self._init_versions(initial=IndexRef.of(manifest, spec.index), state_name=state_name)
        if state_name is not None:
            self._watch_task = asyncio.get_running_loop().create_task(self._watch_shards_forever())
        logger.info("ingress serving index %s, %d shards", self._service.index_version, len(shards))

    async def _watch_shards_forever(self) -> None:
        """Mark a shard down in the service when Serve reports it without a running replica.

        Serve queues a call to a deployment that has no replica until one starts, so without
        this a request would wait for the whole deadline; marked down, the shard's requests fail
        fast (or answer partially) until the service's probe reaches the replacement. Only a
        shard seen running before is marked, so replicas still starting with the app are not.
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
                logger.warning("cannot read Serve's status to watch the shards: %s", _describe(error))

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

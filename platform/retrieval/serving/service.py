"""The search logic of the ingress, free of Ray and HTTP so it can be tested in-process.

`SearchService` answers each request with one index version (ARCHITECTURE invariant 1): it
reads its active version into a local once, when the request starts, passes that version with
every shard and embedder call and checks it in every shard reply, so an answer never mixes
embeddings of two model versions. A rolling swap (`retrieval.serving.swap`) changes the active
version with `activate`, one assignment: a request that started before it finishes on the old
version, one that starts after runs on the new. Requests in flight are counted per version so
that the old version is freed only once they have drained. It talks to shards and the embedder through the
small async protocols below; `retrieval.serving.deployments` implements them over Serve
deployment handles.

Queries come as a vector (or several), a gallery id, an image or a text (cross-modal models);
the last two are embedded by the embedder with the pinned version's model. A binary (hamming)
index holds packed hash codes: every query is reduced to its signs and packed (`pack_codes`)
before the search, and each result carries its Hamming ``distance`` and
``score = 1 - 2 * distance / bits``, the cosine similarity of the two ±1 codes, so clients rank
every index by ``score`` alike.

Search parameters (``nprobe``, ``ef_search``) travel with each request; the unset ones take the
manifest's ``search_defaults``, and every reply says which were used (``params``).

Batching (``spec.batching``): concurrent searches with the same index version and parameters are
gathered by a `MicroBatcher` (up to ``max_batch_size`` queries or ``batch_wait_timeout_s``) and
fanned out as ONE ``[Q, D]`` call per shard, with the largest k of the batch; the merged rows are
split back per request. Off, each request is its own fan-out.

Deadlines: a fan-out waits at most ``spec.shard_timeout_s`` for every shard, then cancels the
stragglers. A shard past the deadline, or one with no live replica (a `ShardClient` raises
`ShardUnavailableError`; the call is retried once at once, which Serve routes to another live
replica), is missing: with ``on_shard_timeout: partial`` the reply merges the others and says
``partial: true, missing_shards: [...]``; with ``error`` the request fails, 504
(`ShardTimeoutError`) for a timeout, 503 (`ShardUnavailableError`) for a dead shard. When every
shard is missing the request always fails. A shard found dead is marked down and probed in the
background until it answers again; meanwhile requests count it missing at once instead of
queueing for a replica that is not there (fail fast, then recover when Serve restarts it). The
same deadline bounds id lookups, item and thumbnail reads and the embedder.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np

from retrieval.config import ServingSpec
from retrieval.errors import BadRequestError
from retrieval.evaluation.cross_modal import pack_codes
from retrieval.index.manifest import IndexManifest
from retrieval.index.merge import merge_topk
from retrieval.index.search_params import SearchParams
from retrieval.serving.batching import MicroBatcher
from retrieval.serving.errors import (
    ItemNotFoundError,
    PayloadTooLargeError,
    ShardTimeoutError,
    ShardUnavailableError,
    VersionNotLoadedError,
    VersionUnavailableError,
)
from retrieval.serving.metrics import ServingMetrics
from retrieval.serving.swap import InFlight

logger = logging.getLogger(__name__)

# A text query longer than this is refused (413) before it reaches the embedder; shorter ones
# the text encoder cuts to its own maximum length.
MAX_TEXT_CHARS = 10_000
# How long `readiness` waits for each shard and the embedder to say which versions they hold.
READINESS_TIMEOUT_S = 2.0
# Pause between two probes of a shard found dead, when the probe fails at once.
PROBE_INTERVAL_S = 0.25

ResultT = TypeVar("ResultT")


class ShardClient(Protocol):
    """What the ingress needs from one shard (any replica of it).

    Every method raises `ShardUnavailableError` when no live replica can take the call (it died,
    is restarting or sheds load), so the ingress can retry it or count the shard missing.
    """

    async def search(
        self, queries: np.ndarray, k: int, index_version: str, params: SearchParams | None = None
    ) -> dict[str, Any]:
        """Top-k of ``queries [Q, D]`` with ``params`` (None: the index's defaults).

        Returns:
            A `ShardDeployment.search` reply.
        """
        ...

    async def vector(self, item_id: int, index_version: str) -> np.ndarray | None:
        """The stored vector ``[D]`` of an id, or None if the shard does not hold it."""
        ...

    async def item(self, item_id: int, index_version: str) -> dict[str, Any] | None:
        """The stored metadata of an id, or None if the shard does not hold it."""
        ...

    async def thumbnail(self, item_id: int, index_version: str) -> bytes | None:
        """The stored thumbnail (image file bytes) of an id, or None if there is none."""
        ...

    async def loaded_versions(self) -> list[str]:
        """The index versions the replica that answers holds."""
        ...


class EmbedderClient(Protocol):
    """What the ingress needs from the embedder (any replica of it); raises `ShardUnavailableError` like a shard."""

    async def embed(self, image_bytes: bytes, index_version: str) -> np.ndarray:
        """The embedding ``[D]`` of an encoded image, by the model that built the index."""
        ...

    async def embed_text(self, text: str, index_version: str) -> np.ndarray:
        """The embedding ``[D]`` (±1 code for a hashing model) of a text, by the model that built the index.

        Raises:
            BadRequestError: the model embeds images only.
        """
        ...

    async def loaded_versions(self) -> list[str]:
        """The index versions (models) the replica that answers holds."""
        ...


@dataclass(frozen=True)
class ActiveVersion:
    """The version a request is answered with: its manifest and model reference."""

    manifest: IndexManifest
    model: dict[str, str]

    @property
    def index_version(self) -> str:
        return self.manifest.index_version

    @classmethod
    def of(cls, manifest: IndexManifest) -> ActiveVersion:
        return cls(manifest=manifest, model=manifest.model.model_dump(include={"name", "version", "uri"}))


@dataclass(frozen=True)
class _Query:
    """One request's share of a (possibly batched) fan-out.

    Attributes:
        active: the version the request pinned.
        params: the search settings, manifest defaults applied (equal for a whole batch).
        queries: ``[q, D]`` float32, or packed codes ``uint8 [q, bits / 8]`` for a binary index.
        k: results per query.
        exclude_id: a gallery id dropped from the results (an id query's own item).
    """

    active: ActiveVersion
    params: SearchParams
    queries: np.ndarray
    k: int
    exclude_id: int | None = None

    @property
    def fetch(self) -> int:
        # One extra neighbour when the query item itself will be dropped from the answer.
        return self.k + (self.exclude_id is not None)


@dataclass(frozen=True)
class _Answer:
    """A request's rows of hits and which shards the fan-out missed."""

    rows: list[list[dict[str, Any]]]
    missing_shards: list[int]


@dataclass
class _FanOut:
    replies: list[dict[str, Any]]
    missing_shards: list[int]


class _ShardDown:
    """A shard found without a live replica: why, and the background probe that watches for its return."""

    def __init__(self, reason: str, probe: asyncio.Task[None]) -> None:
        self.reason = reason
        self.probe = probe


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__


def _retrieve_outcome(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


class SearchService:
    """Validates queries, fans them out to every shard, merges and shapes the replies.

    Args:
        manifest: the manifest of the index version this service answers with at first.
        spec: the serving spec (k limits, batching, deadlines).
        shards: one client per shard, in manifest order.
        embedder: the embedder client.
        version_attempts: how many times a shard call is tried when a replica does not hold
            the pinned version, before the request fails with 503.
        metrics: the Prometheus metrics to record into (default: a new registry).
    """

    def __init__(
        self,
        *,
        manifest: IndexManifest,
        spec: ServingSpec,
        shards: Sequence[ShardClient],
        embedder: EmbedderClient,
        version_attempts: int = 3,
        metrics: ServingMetrics | None = None,
    ) -> None:
        if len(shards) != len(manifest.shards):
            raise ValueError(
                f"index {manifest.index_version} has {len(manifest.shards)} shards but {len(shards)} clients were given"
            )
        if version_attempts < 1:
            raise ValueError(f"version_attempts must be >= 1, got {version_attempts}")
        self.spec = spec
        self._active = ActiveVersion.of(manifest)
        self._shards = list(shards)
        self._embedder = embedder
        self._version_attempts = version_attempts
        self._in_flight = InFlight()
        self._metrics = metrics if metrics is not None else ServingMetrics()
        self._metrics.set_version(index_version=manifest.index_version, model=manifest.model.uri)
        self._down: dict[int, _ShardDown] = {}
        # Per shard: calls awaiting an answer, and when one last finished (or the first started).
        self._pending_calls = [0] * len(self._shards)
        self._last_progress = [time.monotonic()] * len(self._shards)
        self._down_signals: dict[int, asyncio.Future[None]] = {}
        self._batcher: MicroBatcher[tuple[str, tuple[int | None, int | None]], _Query, _Answer] | None = None
        if spec.batching:
            self._batcher = MicroBatcher(
                run_batch=self._run_batch, max_batch_size=spec.max_batch_size, wait_timeout_s=spec.batch_wait_timeout_s
            )

    @property
    def active(self) -> ActiveVersion:
        """The version new requests are answered with."""
        return self._active

    @property
    def manifest(self) -> IndexManifest:
        """The active version's manifest."""
        return self._active.manifest

    @property
    def index_version(self) -> str:
        """The active index version."""
        return self._active.index_version

    @property
    def in_flight(self) -> InFlight:
        """Requests running now, per index version."""
        return self._in_flight

    @property
    def metrics(self) -> ServingMetrics:
        """The Prometheus metrics this service records into."""
        return self._metrics

    def activate(self, manifest: IndexManifest) -> None:
        """Answer new requests with ``manifest``'s version; requests already running keep theirs.

        Raises:
            ValueError: the manifest's shard count differs from this service's shard clients.
        """
        if len(manifest.shards) != len(self._shards):
            raise ValueError(
                f"index {manifest.index_version} has {len(manifest.shards)} shards but this service has "
                f"{len(self._shards)} shard clients"
            )
        # One assignment: every request reads `_active` once, at its start (`_pin`).
        self._active = ActiveVersion.of(manifest)
        self._metrics.set_version(index_version=manifest.index_version, model=manifest.model.uri)
        logger.info("now answering with index %s (model %s)", manifest.index_version, manifest.model.uri)

    @contextmanager
    def _pin(self) -> Iterator[ActiveVersion]:
        active = self._active
        with self._in_flight.hold(active.index_version):
            yield active

    def resolve_k(self, k: int | None) -> int:
        """The k to search with: the spec's default when None, else checked against ``max_k``.

        Raises:
            BadRequestError: k outside ``1..max_k``.
        """
        if k is None:
            return self.spec.default_k
        if not 1 <= k <= self.spec.max_k:
            raise BadRequestError(f"k must be between 1 and {self.spec.max_k}, got {k}")
        return k

    def query_vector(
        self, values: Sequence[float], *, dim: int | None = None, binary: bool | None = None
    ) -> np.ndarray:
        """A query vector checked against the index: ``[1, D]`` float32.

        Args:
            values: the vector (for a binary index one real value per bit, its sign taken).
            dim: the dimension to expect (default: the active version's).
            binary: whether the index is a binary one, for the message (default: the active version's).

        Raises:
            BadRequestError: wrong length, or NaN / infinite / float32-overflowing values.
        """
        dim = self.manifest.dim if dim is None else dim
        binary = self.manifest.is_binary if binary is None else binary
        if len(values) != dim:
            if binary:
                raise BadRequestError(
                    f"vector has {len(values)} values, the binary index expects {dim} (one per code bit; "
                    "the sign of each is taken)"
                )
            raise BadRequestError(f"vector has {len(values)} dimensions, the index expects {dim}")
        bad = [position for position, value in enumerate(values) if not math.isfinite(value)]
        query = np.asarray(values, dtype=np.float64)
        if not bad:
            # A finite float64 can still overflow float32 (e.g. 1e39), which Faiss computes in.
            bad = np.flatnonzero(np.abs(query) > np.finfo(np.float32).max).tolist()
        if bad:
            raise BadRequestError(
                f"vector holds {len(bad)} non-finite values (NaN, infinite or beyond float32), "
                f"first at position {bad[0]}"
            )
        return query.astype(np.float32).reshape(1, -1)

    @staticmethod
    def search_params(active: ActiveVersion, params: SearchParams | None) -> SearchParams:
        """The settings a request searches with: its own, the unset ones from the manifest's ``search_defaults``."""
        return (params if params is not None else SearchParams()).with_defaults(active.manifest.search_defaults)

    async def search_vector(
        self, values: Sequence[float], k: int | None, params: SearchParams | None = None
    ) -> dict[str, Any]:
        """Search by a raw query vector of the index's dimension."""
        resolved_k = self.resolve_k(k)
        with self._pin() as active:
            query = self.query_vector(values, dim=active.manifest.dim, binary=active.manifest.is_binary)
            return await self._search_one(active, self._packed(active, query), resolved_k, params, exclude_id=None)

    async def search_vectors(
        self, vectors: Sequence[Sequence[float]], k: int | None, params: SearchParams | None = None
    ) -> dict[str, Any]:
        """Search by several query vectors at once: one list of hits per vector, in order.

        Raises:
            BadRequestError: no vectors, or one of the wrong length or with non-finite values
                (the message names its position).
            PayloadTooLargeError: more than ``spec.max_query_vectors`` vectors.
        """
        resolved_k = self.resolve_k(k)
        if not vectors:
            raise BadRequestError("vectors is empty: give at least one query vector")
        if len(vectors) > self.spec.max_query_vectors:
            raise PayloadTooLargeError(
                f"{len(vectors)} query vectors in one request, the limit is {self.spec.max_query_vectors}"
            )
        with self._pin() as active:
            rows = []
            for position, values in enumerate(vectors):
                try:
                    rows.append(self.query_vector(values, dim=active.manifest.dim, binary=active.manifest.is_binary))
                except BadRequestError as error:
                    raise BadRequestError(f"vectors[{position}]: {error}") from None
            queries = self._packed(active, np.concatenate(rows))
            settings = self.search_params(active, params)
            answer = await self._submit(_Query(active=active, params=settings, queries=queries, k=resolved_k))
            return self._reply(active, settings, resolved_k, answer, results=answer.rows)

    async def search_image(
        self, image_bytes: bytes, k: int | None, params: SearchParams | None = None
    ) -> dict[str, Any]:
        """Embed an encoded image with the index's model version and search with it."""
        resolved_k = self.resolve_k(k)
        with self._pin() as active:
            vector = await self._bounded(
                "the embedder", lambda: self._embedder.embed(image_bytes, active.index_version)
            )
            return await self._search_one(active, self._embedded(active, vector), resolved_k, params, exclude_id=None)

    async def search_text(self, text: str, k: int | None, params: SearchParams | None = None) -> dict[str, Any]:
        """Embed a text with the index's model version and search with it (cross-modal models).

        Raises:
            BadRequestError: empty or whitespace-only text, or a model that embeds images only.
            PayloadTooLargeError: a text longer than `MAX_TEXT_CHARS` characters.
        """
        resolved_k = self.resolve_k(k)
        if not text.strip():
            raise BadRequestError("text is empty: give a non-blank query text")
        if len(text) > MAX_TEXT_CHARS:
            raise PayloadTooLargeError(f"text has {len(text)} characters, the limit is {MAX_TEXT_CHARS}")
        with self._pin() as active:
            vector = await self._bounded("the embedder", lambda: self._embedder.embed_text(text, active.index_version))
            return await self._search_one(active, self._embedded(active, vector), resolved_k, params, exclude_id=None)

    async def search_id(self, item_id: int, k: int | None, params: SearchParams | None = None) -> dict[str, Any]:
        """Neighbours of a gallery item, excluding the item itself.

        Raises:
            ItemNotFoundError: the id is not in the index.
        """
        resolved_k = self.resolve_k(k)
        with self._pin() as active:
            vector = await self._lookup(active, item_id, "vector", lambda shard: shard.vector)
            if vector is None:
                raise ItemNotFoundError(f"no item with id {item_id} in index {active.index_version}")
            query = np.asarray(vector, dtype=np.float32).reshape(1, -1)
            return await self._search_one(active, self._packed(active, query), resolved_k, params, exclude_id=item_id)

    async def item(self, item_id: int) -> dict[str, Any]:
        """The stored metadata of one gallery item, with the model and index version.

        Raises:
            ItemNotFoundError: the id is not in the index.
        """
        with self._pin() as active:
            found = await self._lookup(active, item_id, "item", lambda shard: shard.item)
            if found is None:
                raise ItemNotFoundError(f"no item with id {item_id} in index {active.index_version}")
            return {"model": active.model, "index_version": active.index_version, "item": found}

    async def thumbnail(self, item_id: int) -> bytes:
        """The stored thumbnail of one gallery item (image file bytes).

        Raises:
            ItemNotFoundError: the id is not in the index, or the index holds no thumbnails.
        """
        with self._pin() as active:
            if not active.manifest.thumbnails:
                raise ItemNotFoundError(
                    f"index {active.index_version} was built without thumbnails (no thumbnail for id {item_id})"
                )
            found = await self._lookup(active, item_id, "thumbnail", lambda shard: shard.thumbnail)
            if found is None:
                raise ItemNotFoundError(f"no thumbnail for id {item_id} in index {active.index_version}")
            return found

    def version_info(self) -> dict[str, Any]:
        """The model, the index version and the whole manifest this service answers with."""
        manifest = self._active.manifest
        return {
            "model": manifest.model.model_dump(mode="json"),
            "index_version": manifest.index_version,
            "manifest": manifest.model_dump(mode="json"),
        }

    async def readiness(self) -> dict[str, Any]:
        """Whether every shard and the embedder answer (within `READINESS_TIMEOUT_S`) holding the active version.

        Returns:
            ``{"ready", "index_version", "shards": [{"shard", "ready", "versions"} or
            {"shard", "ready": False, "error"}], "embedder": {"ready", "versions" or "error"}}``.
        """
        version = self._active.index_version

        async def held(client: ShardClient | EmbedderClient, down: _ShardDown | None) -> list[str]:
            if down is not None:
                raise ShardUnavailableError(f"no live replica ({down.reason})")
            return list(await asyncio.wait_for(client.loaded_versions(), timeout=READINESS_TIMEOUT_S))

        answers = await asyncio.gather(
            *(held(client, self._down.get(index)) for index, client in enumerate(self._shards)),
            held(self._embedder, None),
            return_exceptions=True,
        )

        def state(answer: list[str] | BaseException) -> dict[str, Any]:
            if isinstance(answer, asyncio.TimeoutError):
                return {"ready": False, "error": f"no answer within {READINESS_TIMEOUT_S} s"}
            if isinstance(answer, BaseException):
                return {"ready": False, "error": _describe(answer)}
            return {"ready": version in answer, "versions": sorted(answer)}

        shards = [{"shard": index, **state(answer)} for index, answer in enumerate(answers[:-1])]
        embedder = state(answers[-1])
        return {
            "ready": all(shard["ready"] for shard in shards) and embedder["ready"],
            "index_version": version,
            "shards": shards,
            "embedder": embedder,
        }

    @staticmethod
    def _packed(active: ActiveVersion, queries: np.ndarray) -> np.ndarray:
        """``queries [Q, D]`` as the shards take them: packed sign bits ``uint8 [Q, D / 8]`` for a binary index."""
        return pack_codes(queries) if active.manifest.is_binary else queries

    def _embedded(self, active: ActiveVersion, vector: np.ndarray) -> np.ndarray:
        query = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        if query.shape[1] != active.manifest.dim:
            raise RuntimeError(
                f"the embedder returned {query.shape[1]} dimensions, index {active.index_version} has "
                f"{active.manifest.dim}"
            )
        return self._packed(active, query)

    def _shard_index_of(self, active: ActiveVersion, item_id: int) -> int | None:
        # Shards hold contiguous id ranges, so the manifest alone says where an id can be.
        for index, info in enumerate(active.manifest.shards):
            if info.id_min <= item_id <= info.id_max:
                return index
        return None

    async def _lookup(
        self,
        active: ActiveVersion,
        item_id: int,
        what: str,
        method: Callable[[ShardClient], Callable[[int, str], Awaitable[ResultT | None]]],
    ) -> ResultT | None:
        """Read one id's ``what`` from the shard that holds its range (None: no such id), within the deadline."""
        index = self._shard_index_of(active, item_id)
        if index is None:
            return None
        shard = self._shards[index]
        self._raise_if_down(index)
        with self._tracked(index):
            return await self._bounded(
                f"shard {index}", lambda: method(shard)(item_id, active.index_version), shard=index
            )

    async def _bounded(self, what: str, call: Callable[[], Awaitable[ResultT]], *, shard: int | None = None) -> ResultT:
        """``call()`` within the deadline, retried once at once when no replica could take it.

        Args:
            what: who answers, for messages (``"shard 1"``, ``"the embedder"``).
            call: the call to make (made again for the retry).
            shard: the shard ``call`` goes to, marked down when it has no live replica.

        Raises:
            ShardTimeoutError: no answer within ``spec.shard_timeout_s``.
            ShardUnavailableError: no live replica, twice.
        """

        async def retried_once() -> ResultT:
            try:
                return await call()
            except ShardUnavailableError as error:
                logger.warning("%s: no live replica (%s); retrying once", what, error)
            try:
                return await call()
            except ShardUnavailableError as error:
                if shard is not None:
                    self._mark_down(shard, str(error))
                raise ShardUnavailableError(f"{what} has no live replica ({error}); retry later") from None

        try:
            return await asyncio.wait_for(retried_once(), timeout=self.spec.shard_timeout_s)
        except asyncio.TimeoutError:
            raise ShardTimeoutError(f"{what} did not answer within {self.spec.shard_timeout_s} s") from None

    async def _search_one(
        self,
        active: ActiveVersion,
        queries: np.ndarray,
        k: int,
        params: SearchParams | None,
        *,
        exclude_id: int | None,
    ) -> dict[str, Any]:
        settings = self.search_params(active, params)
        answer = await self._submit(_Query(active=active, params=settings, queries=queries, k=k, exclude_id=exclude_id))
        return self._reply(active, settings, k, answer, results=answer.rows[0])

    def _reply(
        self, active: ActiveVersion, settings: SearchParams, k: int, answer: _Answer, *, results: Any
    ) -> dict[str, Any]:
        return {
            "model": active.model,
            "index_version": active.index_version,
            "modality": active.manifest.modality,
            "k": k,
            "params": settings.as_dict(),
            "partial": bool(answer.missing_shards),
            "missing_shards": answer.missing_shards,
            "results": results,
        }

    async def _submit(self, query: _Query) -> _Answer:
        """Search through the router's batcher, or alone when batching is off."""
        if self._batcher is None:
            return (await self._run_batch((query.active.index_version, query.params.key()), [query]))[0]
        key = (query.active.index_version, query.params.key())
        return await self._batcher.submit(key, query, size=len(query.queries))

    async def _run_batch(self, key: tuple[str, tuple[int | None, int | None]], batch: list[_Query]) -> list[_Answer]:
        """One fan-out for every query of ``batch`` (same version and params), split back per request."""
        active, params = batch[0].active, batch[0].params
        queries = np.concatenate([query.queries for query in batch])
        fetch = max(query.fetch for query in batch)
        if self._batcher is not None:
            self._metrics.observe_batch(stage="router", size=len(queries))
        fan_out = await self._fan_out(active, queries, fetch, params)
        scores, ids = merge_topk(
            results=[(reply["scores"], reply["ids"]) for reply in fan_out.replies],
            k=fetch,
            metric=active.manifest.metric,
        )
        items: dict[int, dict[str, Any]] = {}
        for reply in fan_out.replies:
            items.update(reply["items"])
        answers = []
        row = 0
        for query in batch:
            rows = [
                self._hits(active, scores[row + offset], ids[row + offset], items, query)
                for offset in range(len(query.queries))
            ]
            row += len(query.queries)
            answers.append(_Answer(rows=rows, missing_shards=list(fan_out.missing_shards)))
        return answers

    @staticmethod
    def _hits(
        active: ActiveVersion, scores: np.ndarray, ids: np.ndarray, items: dict[int, dict[str, Any]], query: _Query
    ) -> list[dict[str, Any]]:
        """One query's results from its merged row ``scores [fetch]``, ``ids [fetch]``: its own k, its item excluded."""
        bits = active.manifest.bits
        results: list[dict[str, Any]] = []
        for score, item_id in zip(scores.tolist(), ids.tolist(), strict=True):
            if len(results) == query.k:
                break
            if item_id < 0 or item_id == query.exclude_id:
                continue
            fields = {
                name: value for name, value in items.get(item_id, {}).items() if name not in ("id", "score", "distance")
            }
            if bits is None:
                results.append({"id": item_id, "score": score, **fields})
            else:
                distance = int(score)
                results.append({"id": item_id, "score": 1.0 - 2.0 * distance / bits, "distance": distance, **fields})
        return results

    async def _fan_out(self, active: ActiveVersion, queries: np.ndarray, k: int, params: SearchParams) -> _FanOut:
        """Every shard's top-k of ``queries [Q, D]``, waiting at most the deadline; missing shards listed.

        Raises:
            ShardTimeoutError / ShardUnavailableError: every shard is missing, or one is and the
                spec asks for an error.
            VersionUnavailableError, BadRequestError, ...: a shard's own error (not a missing shard).
        """
        version = active.index_version
        started = time.monotonic()
        # Shards whose call hit a dead replica in this fan-out (their retry may still be queued).
        hit_dead: dict[int, str] = {}
        tasks = {
            asyncio.ensure_future(self._shard_search(index, shard, queries, k, version, params, hit_dead)): index
            for index, shard in enumerate(self._shards)
        }
        try:
            done, pending = await asyncio.wait(list(tasks), timeout=self.spec.shard_timeout_s)
        finally:
            for task in tasks:
                if not task.done():
                    task.cancel()
                    # A straggler may still end in an error after its cancellation; nobody awaits it.
                    task.add_done_callback(_retrieve_outcome)
        replies: dict[int, dict[str, Any]] = {}
        timed_out: list[int] = []
        unavailable: dict[int, str] = {}
        for index in sorted(tasks[task] for task in pending):
            # Past the deadline after its replica died, or while it is known down: Serve is queueing
            # the call for a replica that is not there, which is a dead shard, not a slow one.
            reason = hit_dead.get(index) or (self._down[index].reason if index in self._down else None)
            waited = time.monotonic() - started
            if reason is None:
                timed_out.append(index)
                self._metrics.observe_shard(shard=index, outcome="timeout", seconds=waited)
            else:
                unavailable[index] = (
                    f"shard {index} has no live replica ({reason}); none answered within {self.spec.shard_timeout_s} s"
                )
                self._metrics.observe_shard(shard=index, outcome="unavailable", seconds=waited)
                self._mark_down(index, reason)
        failures: list[tuple[int, BaseException]] = []
        for task in done:
            index = tasks[task]
            error = task.exception()
            if error is None:
                replies[index] = task.result()
            elif isinstance(error, ShardUnavailableError):
                unavailable[index] = str(error)
            else:
                failures.append((index, error))
        if failures:
            raise min(failures, key=lambda failure: failure[0])[1]
        missing = sorted([*timed_out, *unavailable])
        if missing:
            self._missing(version, timed_out=timed_out, unavailable=unavailable, complete_failure=not replies)
        return _FanOut(replies=[replies[index] for index in sorted(replies)], missing_shards=missing)

    def _missing(
        self, version: str, *, timed_out: list[int], unavailable: dict[int, str], complete_failure: bool
    ) -> None:
        """Raise for missing shards as the spec says, or count a partial reply."""
        timeout_text = (
            f"shard{'s' if len(timed_out) > 1 else ''} {', '.join(map(str, timed_out))} did not answer within "
            f"{self.spec.shard_timeout_s} s (index {version})"
        )
        dead_text = "; ".join(reason for _, reason in sorted(unavailable.items()))
        if complete_failure or self.spec.on_shard_timeout == "error":
            if unavailable:
                raise ShardUnavailableError(f"{dead_text}; retry later" + (f"; {timeout_text}" if timed_out else ""))
            raise ShardTimeoutError(timeout_text)
        self._metrics.count_partial()
        logger.warning(
            "partial reply: %s", "; ".join(text for text in (timeout_text if timed_out else "", dead_text) if text)
        )

    async def _shard_search(
        self,
        index: int,
        shard: ShardClient,
        queries: np.ndarray,
        k: int,
        version: str,
        params: SearchParams,
        hit_dead: dict[int, str],
    ) -> dict[str, Any]:
        """One shard's reply, retrying a replica without the version and, once, a dead replica.

        Raises:
            ShardUnavailableError: the shard is down, goes down while the call waits, or its
                replica is dead twice (the message names the shard).
        """
        started = time.monotonic()
        outcome: str | None = "unavailable"
        try:
            self._raise_if_down(index)
            with self._tracked(index):
                reply = await self._unless_down(
                    index, self._shard_attempts(index, shard, queries, k, version, params, hit_dead)
                )
            outcome = "ok"
            return reply
        except ShardUnavailableError:
            raise
        except asyncio.CancelledError:
            # Past the deadline (the fan-out counts it) or the caller went away.
            outcome = None
            raise
        except Exception:
            outcome = "error"
            raise
        finally:
            if outcome is not None:
                self._metrics.observe_shard(shard=index, outcome=outcome, seconds=time.monotonic() - started)

    async def _unless_down(self, index: int, call: Awaitable[dict[str, Any]]) -> dict[str, Any]:
        """Await ``call`` to shard ``index``, giving up as soon as the shard is marked down.

        Serve queues a call to a deployment left without replicas, so a call made just before
        the shard was found dead would otherwise wait out the whole deadline.
        """
        task = asyncio.ensure_future(call)
        went_down = self._down_signal(index)
        try:
            waiting: set[asyncio.Future[Any]] = {task, went_down}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
                task.add_done_callback(_retrieve_outcome)
        if not task.done() or task.cancelled():
            self._raise_if_down(index)
            raise ShardUnavailableError(f"shard {index} went down while answering")
        try:
            return task.result()
        except ShardUnavailableError as error:
            self._mark_down(index, str(error))
            raise ShardUnavailableError(f"shard {index} has no live replica ({error})") from None

    def _down_signal(self, index: int) -> asyncio.Future[None]:
        """A future that completes when shard ``index`` is next marked down (one shared by all its calls)."""
        loop = asyncio.get_running_loop()
        signal = self._down_signals.get(index)
        if signal is None or signal.done() or signal.get_loop() is not loop:
            signal = loop.create_future()
            self._down_signals[index] = signal
        return signal

    async def _shard_attempts(
        self,
        index: int,
        shard: ShardClient,
        queries: np.ndarray,
        k: int,
        version: str,
        params: SearchParams,
        hit_dead: dict[int, str],
    ) -> dict[str, Any]:
        dead_retries = 1
        for attempt in range(1, self._version_attempts + 1):
            while True:
                try:
                    reply = await shard.search(queries, k, version, params)
                    break
                except ShardUnavailableError as error:
                    if dead_retries == 0:
                        raise
                    dead_retries -= 1
                    hit_dead[index] = str(error)
                    logger.warning("shard %d: no live replica (%s); retrying once", index, error)
                except VersionNotLoadedError as error:
                    logger.warning("shard %d, attempt %d/%d: %s", index, attempt, self._version_attempts, error)
                    reply = None
                    break
            if reply is None:
                continue
            if reply.get("index_version") != version:
                # A reply for another version must never be merged: its scores live in another space.
                logger.error(
                    "shard %d answered for %s instead of %s; retrying", index, reply.get("index_version"), version
                )
                continue
            return dict(reply)
        raise VersionUnavailableError(
            f"no replica of shard {index} answered for index version {version} after {self._version_attempts} attempts"
        )

    @contextmanager
    def _tracked(self, index: int) -> Iterator[None]:
        """Count one call to shard ``index`` in flight, for `stalled_shards`."""
        if self._pending_calls[index] == 0:
            self._last_progress[index] = time.monotonic()
        self._pending_calls[index] += 1
        try:
            yield
        finally:
            self._pending_calls[index] -= 1
            self._last_progress[index] = time.monotonic()

    def stalled_shards(self, *, after_s: float) -> list[int]:
        """Shards (manifest order) with calls in flight of which none has finished for ``after_s`` seconds.

        A shard whose replicas died looks like this (Serve queues its calls); a watcher asks
        Serve about these shards only, instead of polling Serve's status on every tick.
        """
        now = time.monotonic()
        return [
            index
            for index, pending in enumerate(self._pending_calls)
            if pending and now - self._last_progress[index] >= after_s
        ]

    def _raise_if_down(self, index: int) -> None:
        down = self._down.get(index)
        if down is not None and down.probe.done():
            # Its probe ended without seeing the shard back (its event loop closed): probe afresh.
            self._down.pop(index, None)
            return
        if down is not None:
            raise ShardUnavailableError(f"shard {index} has no live replica ({down.reason}); Serve is replacing it")

    def mark_shard_down(self, index: int, reason: str) -> None:
        """Count shard ``index`` (manifest order) as down until it answers a probe: its requests fail fast meanwhile.

        For a watcher that learns from Serve that a shard has no running replica, before any
        request meets the dead one (Serve queues calls to a deployment without replicas).
        Must be called on the service's event loop.
        """
        if not 0 <= index < len(self._shards):
            raise ValueError(f"shard {index} does not exist; this service has {len(self._shards)} shards")
        self._mark_down(index, reason)

    def _mark_down(self, index: int, reason: str) -> None:
        """Count shard ``index`` as down until a background probe gets an answer from it."""
        if index in self._down:
            return
        logger.error("shard %d is down (%s); probing it until it answers again", index, reason)
        probe = asyncio.get_running_loop().create_task(self._probe(index))
        self._down[index] = _ShardDown(reason=reason, probe=probe)
        signal = self._down_signals.pop(index, None)
        if signal is not None and not signal.done():
            signal.set_result(None)

    async def _probe(self, index: int) -> None:
        shard = self._shards[index]
        while True:
            try:
                # With no live replica Serve queues the call until one starts: the wait is the probe.
                await asyncio.wait_for(shard.loaded_versions(), timeout=self.spec.shard_timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                logger.debug("shard %d still down: %s", index, _describe(error))
                await asyncio.sleep(PROBE_INTERVAL_S)
                continue
            self._down.pop(index, None)
            logger.info("shard %d answers again", index)
            return

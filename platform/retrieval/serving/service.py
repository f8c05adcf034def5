"""The search logic of the ingress, free of Ray and HTTP so it can be tested in-process.

`SearchService` answers each request with one index version (ARCHITECTURE invariant 1): it
reads its active version once, when the request starts, passes that version with every shard
and embedder call, and the shard pool checks it in every shard reply, so an answer never mixes
embeddings of two model versions. A rolling swap (`retrieval.serving.swap`) changes the active
version with `activate`, one assignment: a request that started before it finishes on the old
version, one that starts after runs on the new. Requests in flight are counted per version so
that the old version is freed only once they have drained.

Queries come as a vector (or several), a gallery id, an image or a text (cross-modal models);
the last two are embedded with the pinned version's model. A binary (hamming) index holds packed
hash codes: every query is reduced to its signs and packed (`pack_codes`) before the search, and
each result carries its Hamming ``distance`` and ``score = 1 - 2 * distance / bits``, the cosine
similarity of the two ±1 codes, so clients rank every index by ``score`` alike.

Search parameters (``nprobe``, ``ef_search``) travel with each request; the unset ones take the
manifest's ``search_defaults``, and every reply says which were used (``params``).

Batching (``spec.batching``): concurrent searches with the same index version and parameters are
gathered by a `MicroBatcher` (up to ``max_batch_size`` queries or ``batch_wait_timeout_s``) and
fanned out as ONE ``[Q, D]`` call per shard, with the largest k of the batch; the merged rows are
split back per request. When the shards are searched in this process, one batch runs at a time
(``max_concurrent_batches``) and the next grows while it runs: Faiss answers 8 queries in one
pass over a shard for little more than one. Off, each request is its own fan-out.

The shards are reached through a `ShardPool` (`retrieval.serving.shard_pool`): held in this
process (the local layout) or as Serve deployments (the distributed layout), under one deadline
and retry policy; the same deadline bounds the embedder.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from retrieval.config import ServingSpec
from retrieval.errors import BadRequestError
from retrieval.index.manifest import IndexManifest
from retrieval.index.merge import merge_topk
from retrieval.index.search_params import SearchParams
from retrieval.models.codes import pack_codes
from retrieval.serving.batching import MicroBatcher
from retrieval.serving.clients import EmbedderClient, ShardClient
from retrieval.serving.errors import ItemNotFoundError, PayloadTooLargeError
from retrieval.serving.metrics import ServingMetrics
from retrieval.serving.replies import Hit, ItemReply, ModelInfo, Readiness, SearchReply
from retrieval.serving.shard_pool import ShardPool
from retrieval.serving.swap import InFlight

logger = logging.getLogger(__name__)

# A text query longer than this is refused (413) before it reaches the embedder; shorter ones
# the text encoder cuts to its own maximum length.
MAX_TEXT_CHARS = 10_000
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_HIT_RESERVED = frozenset({"id", "score", "distance"})


@dataclass(frozen=True)
class ActiveVersion:
    """The version a request is answered with: its manifest, model, and its resolved default settings."""

    manifest: IndexManifest
    model: ModelInfo
    defaults: SearchParams = field(default_factory=SearchParams)

    @property
    def index_version(self) -> str:
        return self.manifest.index_version

    @classmethod
    def of(cls, manifest: IndexManifest) -> ActiveVersion:
        return cls(
            manifest=manifest,
            model=ModelInfo(name=manifest.model.name, version=manifest.model.version, uri=manifest.model.uri),
            defaults=SearchParams().with_defaults(manifest.search_defaults),
        )

    def settings(self, params: SearchParams | None) -> SearchParams:
        """The settings a request searches with: its own, the unset ones from the manifest's ``search_defaults``."""
        if params is None or params.is_default:
            return self.defaults
        return params.with_defaults(self.manifest.search_defaults)


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

    rows: list[list[Hit]]
    missing_shards: list[int]


_BatchKey = tuple[str, tuple[int | None, int | None]]


def model_label(manifest: IndexManifest) -> str:
    """``name/version`` of the index's model, for the open /metrics (a model URI may be a server path)."""
    return f"{manifest.model.name}/{manifest.model.version}"


class SearchService:
    """Validates queries, fans them out to every shard, merges and shapes the replies.

    Args:
        manifest: the manifest of the index version this service answers with at first.
        spec: the serving spec (k limits, batching, deadlines).
        shards: one client per shard, in manifest order (local or remote, `retrieval.serving.clients`).
        embedder: the embedder client.
        version_attempts: how many times a shard call is tried when a replica does not hold
            the pinned version, before the request fails with 503.
        metrics: the metrics to record into (default: a prometheus-client registry of its own).
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
        self.spec = spec
        self._active = ActiveVersion.of(manifest)
        self._embedder = embedder
        self._in_flight = InFlight()
        self._metrics = metrics if metrics is not None else ServingMetrics()
        self._metrics.set_version(index_version=manifest.index_version, model=model_label(manifest))
        self.pool = ShardPool(spec=spec, shards=shards, metrics=self._metrics, version_attempts=version_attempts)
        self._batcher: MicroBatcher[_BatchKey, _Query, _Answer] | None = None
        if spec.batching:
            concurrent = spec.max_concurrent_batches
            if concurrent is None and self.pool.is_local:
                # Searched on this replica's own cores: one batch at a time, the next gathering meanwhile.
                concurrent = 1
            self._batcher = MicroBatcher(
                run_batch=self._run_batch,
                max_batch_size=spec.max_batch_size,
                wait_timeout_s=spec.batch_wait_timeout_s,
                max_concurrent_batches=concurrent,
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
        """The metrics this service records into."""
        return self._metrics

    @property
    def layout(self) -> str:
        """``local`` when every shard is held in this process, else ``distributed``."""
        return "local" if self.pool.is_local else "distributed"

    def activate(self, manifest: IndexManifest) -> None:
        """Answer new requests with ``manifest``'s version; requests already running keep theirs.

        Raises:
            ValueError: the manifest's shard count differs from this service's shard clients.
        """
        if len(manifest.shards) != len(self.pool):
            raise ValueError(
                f"index {manifest.index_version} has {len(manifest.shards)} shards but this service has "
                f"{len(self.pool)} shard clients"
            )
        # One assignment: every request reads `_active` once, at its start (`_pin`).
        self._active = ActiveVersion.of(manifest)
        self._metrics.set_version(index_version=manifest.index_version, model=model_label(manifest))
        logger.info("now answering with index %s (model %s)", manifest.index_version, manifest.model.uri)

    def stalled_shards(self, *, after_s: float) -> list[int]:
        """See `ShardPool.stalled_shards`."""
        return self.pool.stalled_shards(after_s=after_s)

    def mark_shard_down(self, index: int, reason: str) -> None:
        """See `ShardPool.mark_shard_down`."""
        self.pool.mark_shard_down(index, reason)

    @contextmanager
    def _pin(self) -> Iterator[ActiveVersion]:
        active = self._active
        with self._in_flight.hold(active.index_version):
            yield active

    # ------------------------------------------------------------------ validation

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
        query = np.asarray(values, dtype=np.float64)
        magnitude = np.abs(query)
        # NaN compares False, so a finite float32 range check also catches NaN and infinities.
        if not (magnitude <= _FLOAT32_MAX).all():
            bad = np.flatnonzero(~np.isfinite(query))
            if not len(bad):
                # A finite float64 can still overflow float32 (e.g. 1e39), which Faiss computes in.
                bad = np.flatnonzero(magnitude > _FLOAT32_MAX)
            raise BadRequestError(
                f"vector holds {len(bad)} non-finite values (NaN, infinite or beyond float32), "
                f"first at position {bad[0]}"
            )
        return query.astype(np.float32).reshape(1, -1)

    def search_params(self, active: ActiveVersion, params: SearchParams | None) -> SearchParams:
        """The settings a request searches with: its own, the unset ones from the manifest's ``search_defaults``.

        Raises:
            BadRequestError: a setting above the service's ``max_nprobe`` / ``max_ef_search``: one
                request could otherwise hold a replica for seconds and gigabytes (an ``ef_search``
                of 10^8 took 7 s and 826 MB on a 2,000-vector HNSW shard).
        """
        if params is not None:
            for name, value, limit in (
                ("nprobe", params.nprobe, self.spec.max_nprobe),
                ("ef_search", params.ef_search, self.spec.max_ef_search),
            ):
                if value is not None and value > limit:
                    raise BadRequestError(f"{name} must be at most {limit} on this service (max_{name}), got {value}")
        return active.settings(params)

    # ------------------------------------------------------------------ searches

    async def search_vector(
        self, values: Sequence[float], k: int | None, params: SearchParams | None = None
    ) -> SearchReply:
        """Search by a raw query vector of the index's dimension."""
        resolved_k = self.resolve_k(k)
        with self._pin() as active:
            query = self.query_vector(values, dim=active.manifest.dim, binary=active.manifest.is_binary)
            return await self._search_one(active, self._packed(active, query), resolved_k, params, exclude_id=None)

    async def search_vectors(
        self, vectors: Sequence[Sequence[float]], k: int | None, params: SearchParams | None = None
    ) -> SearchReply:
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
            return self._reply(active, settings, resolved_k, answer, results=answer.rows, batch=True)

    async def search_image(self, image_bytes: bytes, k: int | None, params: SearchParams | None = None) -> SearchReply:
        """Embed an encoded image with the index's model version and search with it."""
        resolved_k = self.resolve_k(k)
        with self._pin() as active:
            vector = await self.pool.bounded(
                "the embedder", lambda: self._embedder.embed(image_bytes, active.index_version)
            )
            return await self._search_one(active, self._embedded(active, vector), resolved_k, params, exclude_id=None)

    async def search_text(self, text: str, k: int | None, params: SearchParams | None = None) -> SearchReply:
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
            vector = await self.pool.bounded(
                "the embedder", lambda: self._embedder.embed_text(text, active.index_version)
            )
            return await self._search_one(active, self._embedded(active, vector), resolved_k, params, exclude_id=None)

    async def search_id(self, item_id: int, k: int | None, params: SearchParams | None = None) -> SearchReply:
        """Neighbours of a gallery item, excluding the item itself.

        Raises:
            ItemNotFoundError: the id is not in the index.
        """
        resolved_k = self.resolve_k(k)
        with self._pin() as active:
            vector = await self.pool.lookup(active.manifest, item_id, lambda shard: shard.vector)
            if vector is None:
                raise ItemNotFoundError(f"no item with id {item_id} in index {active.index_version}")
            query = np.asarray(vector, dtype=np.float32).reshape(1, -1)
            return await self._search_one(active, self._packed(active, query), resolved_k, params, exclude_id=item_id)

    async def item(self, item_id: int) -> ItemReply:
        """The stored metadata of one gallery item, with the model and index version.

        Raises:
            ItemNotFoundError: the id is not in the index.
        """
        with self._pin() as active:
            found = await self.pool.lookup(active.manifest, item_id, lambda shard: shard.item)
            if found is None:
                raise ItemNotFoundError(f"no item with id {item_id} in index {active.index_version}")
            return ItemReply(model=active.model, index_version=active.index_version, item=found)

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
            found = await self.pool.lookup(active.manifest, item_id, lambda shard: shard.thumbnail)
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

    async def readiness(self) -> Readiness:
        """Whether every shard and the embedder answer holding the active version."""
        version = self._active.index_version
        shards, embedder = await self.pool.readiness(version, self._embedder)
        return Readiness(index_version=version, shards=shards, embedder=embedder, layout=self.layout)

    # ------------------------------------------------------------------ internals

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

    async def _search_one(
        self,
        active: ActiveVersion,
        queries: np.ndarray,
        k: int,
        params: SearchParams | None,
        *,
        exclude_id: int | None,
    ) -> SearchReply:
        settings = self.search_params(active, params)
        answer = await self._submit(_Query(active=active, params=settings, queries=queries, k=k, exclude_id=exclude_id))
        return self._reply(active, settings, k, answer, results=answer.rows[0])

    @staticmethod
    def _reply(
        active: ActiveVersion,
        settings: SearchParams,
        k: int,
        answer: _Answer,
        *,
        results: list[Hit] | list[list[Hit]],
        batch: bool = False,
    ) -> SearchReply:
        return SearchReply(
            model=active.model,
            index_version=active.index_version,
            modality=active.manifest.modality,
            k=k,
            params=settings.as_dict(),
            missing_shards=answer.missing_shards,
            results=results,
            batch=batch,
        )

    async def _submit(self, query: _Query) -> _Answer:
        """Search through the router's batcher, or alone when batching is off."""
        key = (query.active.index_version, query.params.key())
        if self._batcher is None:
            return (await self._run_batch(key, [query]))[0]
        return await self._batcher.submit(key, query, size=len(query.queries))

    async def _run_batch(self, key: _BatchKey, batch: list[_Query]) -> list[_Answer]:
        """One fan-out for every query of ``batch`` (same version and params), split back per request."""
        active, params = batch[0].active, batch[0].params
        queries = batch[0].queries if len(batch) == 1 else np.concatenate([query.queries for query in batch])
        fetch = max(query.fetch for query in batch)
        if self._batcher is not None:
            self._metrics.observe_batch(stage="router", size=len(queries))
        fan_out = await self.pool.fan_out(queries, fetch, active.index_version, params)
        scores, ids = merge_topk(
            results=[(reply.scores, reply.ids) for reply in fan_out.replies], k=fetch, metric=active.manifest.metric
        )
        items: dict[int, dict[str, Any]] = {}
        for reply in fan_out.replies:
            items.update(reply.items)
        bits = active.manifest.bits
        score_rows, id_rows = scores.tolist(), ids.tolist()
        answers = []
        row = 0
        for query in batch:
            rows = [
                self._hits(score_rows[row + offset], id_rows[row + offset], items, query, bits)
                for offset in range(len(query.queries))
            ]
            row += len(query.queries)
            answers.append(_Answer(rows=rows, missing_shards=list(fan_out.missing_shards)))
            # One per request, not per fan-out: a batched fan-out answers several requests.
            self._metrics.count_reply(partial=bool(fan_out.missing_shards))
        return answers

    @staticmethod
    def _hits(
        scores: list[float], ids: list[int], items: dict[int, dict[str, Any]], query: _Query, bits: int | None
    ) -> list[Hit]:
        """One query's results from its merged row ``scores [fetch]``, ``ids [fetch]``: its own k, its item excluded."""
        results: list[Hit] = []
        for score, item_id in zip(scores, ids, strict=True):
            if len(results) == query.k:
                break
            if item_id < 0 or item_id == query.exclude_id:
                continue
            if bits is None:
                hit: Hit = {"id": item_id, "score": score}
            else:
                distance = int(score)
                hit = {"id": item_id, "score": 1.0 - 2.0 * distance / bits, "distance": distance}
            for name, value in items.get(item_id, {}).items():
                if name not in _HIT_RESERVED:
                    hit[name] = value
            results.append(hit)
        return results

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

Queries come as a vector, a gallery id, an image or a text (cross-modal models); the last two
are embedded by the embedder with the pinned version's model. A binary (hamming) index holds
packed hash codes: every query is reduced to its signs and packed (`pack_codes`) before the
search, and each result carries its Hamming ``distance`` and ``score = 1 - 2 * distance / bits``,
the cosine similarity of the two ±1 codes, so clients rank every index by ``score`` alike.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from retrieval.config import ServingSpec
from retrieval.errors import BadRequestError
from retrieval.evaluation.cross_modal import pack_codes
from retrieval.index.manifest import IndexManifest
from retrieval.index.merge import merge_topk
from retrieval.serving.errors import (
    ItemNotFoundError,
    PayloadTooLargeError,
    VersionNotLoadedError,
    VersionUnavailableError,
)
from retrieval.serving.swap import InFlight

logger = logging.getLogger(__name__)

# A text query longer than this is refused (413) before it reaches the embedder; shorter ones
# the text encoder cuts to its own maximum length.
MAX_TEXT_CHARS = 10_000


class ShardClient(Protocol):
    """What the ingress needs from one shard (any replica of it)."""

    async def search(self, queries: np.ndarray, k: int, index_version: str) -> dict[str, Any]:
        """Top-k of ``queries [Q, D]``: a `ShardDeployment.search` reply."""
        ...

    async def vector(self, item_id: int, index_version: str) -> np.ndarray | None:
        """The stored vector ``[D]`` of an id, or None if the shard does not hold it."""
        ...

    async def item(self, item_id: int, index_version: str) -> dict[str, Any] | None:
        """The stored metadata of an id, or None if the shard does not hold it."""
        ...


class EmbedderClient(Protocol):
    """What the ingress needs from the embedder (any replica of it)."""

    async def embed(self, image_bytes: bytes, index_version: str) -> np.ndarray:
        """The embedding ``[D]`` of an encoded image, by the model that built the index."""
        ...

    async def embed_text(self, text: str, index_version: str) -> np.ndarray:
        """The embedding ``[D]`` (±1 code for a hashing model) of a text, by the model that built the index.

        Raises:
            BadRequestError: the model embeds images only.
        """
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


class SearchService:
    """Validates queries, fans them out to every shard, merges and shapes the replies.

    Args:
        manifest: the manifest of the index version this service answers with at first.
        spec: the serving spec (k limits).
        shards: one client per shard, in manifest order.
        embedder: the embedder client.
        version_attempts: how many times a fan-out is tried when a replica does not hold
            the pinned version, before the request fails with 503.
    """

    def __init__(
        self,
        *,
        manifest: IndexManifest,
        spec: ServingSpec,
        shards: Sequence[ShardClient],
        embedder: EmbedderClient,
        version_attempts: int = 3,
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

    async def search_vector(self, values: Sequence[float], k: int | None) -> dict[str, Any]:
        """Search by a raw query vector of the index's dimension."""
        resolved_k = self.resolve_k(k)
        with self._pin() as active:
            query = self.query_vector(values, dim=active.manifest.dim, binary=active.manifest.is_binary)
            return await self._search(active, self._packed(active, query), resolved_k, exclude_id=None)

    async def search_image(self, image_bytes: bytes, k: int | None) -> dict[str, Any]:
        """Embed an encoded image with the index's model version and search with it."""
        resolved_k = self.resolve_k(k)
        with self._pin() as active:
            vector = await self._embedder.embed(image_bytes, active.index_version)
            return await self._search(active, self._embedded(active, vector), resolved_k, exclude_id=None)

    async def search_text(self, text: str, k: int | None) -> dict[str, Any]:
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
            vector = await self._embedder.embed_text(text, active.index_version)
            return await self._search(active, self._embedded(active, vector), resolved_k, exclude_id=None)

    async def search_id(self, item_id: int, k: int | None) -> dict[str, Any]:
        """Neighbours of a gallery item, excluding the item itself.

        Raises:
            ItemNotFoundError: the id is not in the index.
        """
        resolved_k = self.resolve_k(k)
        with self._pin() as active:
            shard = self._shard_of(active, item_id)
            vector = None if shard is None else await shard.vector(item_id, active.index_version)
            if vector is None:
                raise ItemNotFoundError(f"no item with id {item_id} in index {active.index_version}")
            query = np.asarray(vector, dtype=np.float32).reshape(1, -1)
            return await self._search(active, self._packed(active, query), resolved_k, exclude_id=item_id)

    async def item(self, item_id: int) -> dict[str, Any]:
        """The stored metadata of one gallery item, with the model and index version.

        Raises:
            ItemNotFoundError: the id is not in the index.
        """
        with self._pin() as active:
            shard = self._shard_of(active, item_id)
            found = None if shard is None else await shard.item(item_id, active.index_version)
            if found is None:
                raise ItemNotFoundError(f"no item with id {item_id} in index {active.index_version}")
            return {"model": active.model, "index_version": active.index_version, "item": found}

    def version_info(self) -> dict[str, Any]:
        """The model, the index version and the whole manifest this service answers with."""
        manifest = self._active.manifest
        return {
            "model": manifest.model.model_dump(mode="json"),
            "index_version": manifest.index_version,
            "manifest": manifest.model_dump(mode="json"),
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

    def _shard_of(self, active: ActiveVersion, item_id: int) -> ShardClient | None:
        # Shards hold contiguous id ranges, so the manifest alone says where an id can be.
        for info, client in zip(active.manifest.shards, self._shards, strict=True):
            if info.id_min <= item_id <= info.id_max:
                return client
        return None

    async def _fan_out(self, version: str, queries: np.ndarray, k: int) -> list[dict[str, Any]]:
        for attempt in range(1, self._version_attempts + 1):
            try:
                replies = await asyncio.gather(*(shard.search(queries, k, version) for shard in self._shards))
            except VersionNotLoadedError as error:
                logger.warning("attempt %d/%d: %s", attempt, self._version_attempts, error)
                continue
            wrong = [reply.get("index_version") for reply in replies if reply.get("index_version") != version]
            if wrong:
                # A reply for another version must never be merged: its scores live in another space.
                logger.error("shards answered for %s instead of %s; retrying", wrong, version)
                continue
            return list(replies)
        raise VersionUnavailableError(
            f"no replica answered for index version {version} after {self._version_attempts} attempts"
        )

    async def _search(
        self, active: ActiveVersion, queries: np.ndarray, k: int, *, exclude_id: int | None
    ) -> dict[str, Any]:
        # One extra neighbour when the query item itself will be dropped from the answer.
        fetch = k + (exclude_id is not None)
        replies = await self._fan_out(active.index_version, queries, fetch)
        scores, ids = merge_topk(
            results=[(reply["scores"], reply["ids"]) for reply in replies], k=fetch, metric=active.manifest.metric
        )
        items: dict[int, dict[str, Any]] = {}
        for reply in replies:
            items.update(reply["items"])
        bits = active.manifest.bits
        results = []
        for score, item_id in zip(scores[0].tolist(), ids[0].tolist(), strict=True):
            if item_id < 0 or item_id == exclude_id:
                continue
            fields = {
                name: value for name, value in items.get(item_id, {}).items() if name not in ("id", "score", "distance")
            }
            if bits is None:
                results.append({"id": item_id, "score": score, **fields})
            else:
                distance = int(score)
                results.append({"id": item_id, "score": 1.0 - 2.0 * distance / bits, "distance": distance, **fields})
        return {
            "model": active.model,
            "index_version": active.index_version,
            "modality": active.manifest.modality,
            "k": k,
            "results": results[:k],
        }

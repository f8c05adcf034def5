"""The search logic of the ingress, free of Ray and HTTP so it can be tested in-process.

`SearchService` pins one index version (ARCHITECTURE invariant 1): it passes that version
with every shard and embedder call and checks it in every shard reply, so an answer never
mixes embeddings of two model versions. It talks to shards and the embedder through the
small async protocols below; `retrieval.serving.deployments` implements them over Serve
deployment handles.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from retrieval.config import ServingSpec
from retrieval.errors import BadRequestError
from retrieval.index.manifest import IndexManifest
from retrieval.index.merge import merge_topk
from retrieval.serving.errors import ItemNotFoundError, VersionNotLoadedError, VersionUnavailableError

logger = logging.getLogger(__name__)


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


class SearchService:
    """Validates queries, fans them out to every shard, merges and shapes the replies.

    Args:
        manifest: the manifest of the index version this service answers for.
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
        self.manifest = manifest
        self.spec = spec
        self.index_version = manifest.index_version
        self._shards = list(shards)
        self._embedder = embedder
        self._version_attempts = version_attempts
        self._model = manifest.model.model_dump(include={"name", "version", "uri"})

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

    def query_vector(self, values: Sequence[float]) -> np.ndarray:
        """A query vector checked against the index: ``[1, D]`` float32.

        Raises:
            BadRequestError: wrong length, or NaN / infinite / float32-overflowing values.
        """
        if len(values) != self.manifest.dim:
            raise BadRequestError(f"vector has {len(values)} dimensions, the index expects {self.manifest.dim}")
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
        return await self._search(self.query_vector(values), resolved_k, exclude_id=None)

    async def search_image(self, image_bytes: bytes, k: int | None) -> dict[str, Any]:
        """Embed an encoded image with the index's model version and search with it."""
        resolved_k = self.resolve_k(k)
        vector = await self._embedder.embed(image_bytes, self.index_version)
        query = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        if query.shape[1] != self.manifest.dim:
            raise RuntimeError(
                f"the embedder returned {query.shape[1]} dimensions, index {self.index_version} has {self.manifest.dim}"
            )
        return await self._search(query, resolved_k, exclude_id=None)

    async def search_id(self, item_id: int, k: int | None) -> dict[str, Any]:
        """Neighbours of a gallery item, excluding the item itself.

        Raises:
            ItemNotFoundError: the id is not in the index.
        """
        resolved_k = self.resolve_k(k)
        shard = self._shard_of(item_id)
        vector = None if shard is None else await shard.vector(item_id, self.index_version)
        if vector is None:
            raise ItemNotFoundError(f"no item with id {item_id} in index {self.index_version}")
        query = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        return await self._search(query, resolved_k, exclude_id=item_id)

    async def item(self, item_id: int) -> dict[str, Any]:
        """The stored metadata of one gallery item, with the model and index version.

        Raises:
            ItemNotFoundError: the id is not in the index.
        """
        shard = self._shard_of(item_id)
        found = None if shard is None else await shard.item(item_id, self.index_version)
        if found is None:
            raise ItemNotFoundError(f"no item with id {item_id} in index {self.index_version}")
        return {"model": self._model, "index_version": self.index_version, "item": found}

    def version_info(self) -> dict[str, Any]:
        """The model, the index version and the whole manifest this service answers with."""
        return {
            "model": self.manifest.model.model_dump(mode="json"),
            "index_version": self.index_version,
            "manifest": self.manifest.model_dump(mode="json"),
        }

    def _shard_of(self, item_id: int) -> ShardClient | None:
        # Shards hold contiguous id ranges, so the manifest alone says where an id can be.
        for info, client in zip(self.manifest.shards, self._shards, strict=True):
            if info.id_min <= item_id <= info.id_max:
                return client
        return None

    async def _fan_out(self, queries: np.ndarray, k: int) -> list[dict[str, Any]]:
        for attempt in range(1, self._version_attempts + 1):
            try:
                replies = await asyncio.gather(
                    *(shard.search(queries, k, self.index_version) for shard in self._shards)
                )
            except VersionNotLoadedError as error:
                logger.warning("attempt %d/%d: %s", attempt, self._version_attempts, error)
                continue
            wrong = [
                reply.get("index_version") for reply in replies if reply.get("index_version") != self.index_version
            ]
            if wrong:
                # A reply for another version must never be merged: its scores live in another space.
                logger.error("shards answered for %s instead of %s; retrying", wrong, self.index_version)
                continue
            return list(replies)
        raise VersionUnavailableError(
            f"no replica answered for index version {self.index_version} after {self._version_attempts} attempts"
        )

    async def _search(self, queries: np.ndarray, k: int, *, exclude_id: int | None) -> dict[str, Any]:
        # One extra neighbour when the query item itself will be dropped from the answer.
        fetch = k + (exclude_id is not None)
        replies = await self._fan_out(queries, fetch)
        scores, ids = merge_topk(
            results=[(reply["scores"], reply["ids"]) for reply in replies], k=fetch, metric=self.manifest.metric
        )
        items: dict[int, dict[str, Any]] = {}
        for reply in replies:
            items.update(reply["items"])
        results = []
        for score, item_id in zip(scores[0].tolist(), ids[0].tolist(), strict=True):
            if item_id < 0 or item_id == exclude_id:
                continue
            fields = {name: value for name, value in items.get(item_id, {}).items() if name not in ("id", "score")}
            results.append({"id": item_id, "score": score, **fields})
        return {
            "model": self._model,
            "index_version": self.index_version,
            "k": k,
            "results": results[:k],
        }

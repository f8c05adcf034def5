"""How the ingress reaches a shard or the embedder: the two protocols, and their in-process implementations.

A `ShardClient` is one shard (whichever replica answers), an `EmbedderClient` the query model.
Two layouts implement them:

- local (`LocalShardClient`, `LocalEmbedderClient`): the ingress replica holds the shards (and,
  when configured, the model) itself, in a `ShardHost` / `EmbedderHost`, and calls them on a
  thread pool of its own: no Ray call, no serialisation, one hop per query (proxy -> ingress).
  Faiss and torch release the GIL, so the shards of one fan-out are searched at once while the
  event loop goes on parsing the next requests.
- distributed (`retrieval.serving.handles`): each shard is a Serve deployment reached through
  its handle, for indices larger than one replica.

The service (`retrieval.serving.service`) and the shard pool (`retrieval.serving.shard_pool`)
only see the protocols, so deadlines, partial answers, the version check and the metrics are
the same in both layouts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import numpy as np

from retrieval.index.search_params import SearchParams
from retrieval.serving.batching import MicroBatcher
from retrieval.serving.embedder_host import EmbedCall, EmbedderHost
from retrieval.serving.replies import ShardCall, ShardHits
from retrieval.serving.shard_host import ShardHost

ResultT = TypeVar("ResultT")


class ShardClient(Protocol):
    """What the ingress needs from one shard (any replica of it).

    Every method raises `ShardUnavailableError` when no live replica can take the call (it died,
    is restarting or sheds load), so the ingress can retry it or count the shard missing.
    ``remote`` is False for a shard held in the ingress's own process, which cannot die alone.
    """

    remote: bool

    async def search(
        self, queries: np.ndarray, k: int, index_version: str, params: SearchParams | None = None
    ) -> ShardHits:
        """Top-k of ``queries [Q, D]`` with ``params`` (None: the index's defaults)."""
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

    remote: bool

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


class LocalShardClient:
    """`ShardClient` over one shard of a `ShardHost` in this process, searched on ``executor``'s threads."""

    remote = False

    def __init__(self, host: ShardHost, shard: int, executor: concurrent.futures.Executor) -> None:
        self._host = host
        self._shard = shard
        self._executor = executor

    async def _run(self, function: Callable[..., ResultT], *args: Any) -> ResultT:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def search(
        self, queries: np.ndarray, k: int, index_version: str, params: SearchParams | None = None
    ) -> ShardHits:
        call = ShardCall(queries=queries, k=k, index_version=index_version, params=params or SearchParams())
        return await self._run(self._host.search, self._shard, call)

    async def vector(self, item_id: int, index_version: str) -> np.ndarray | None:
        # An id lookup is a binary search in memory: not worth a thread hop.
        return self._host.vector(self._shard, item_id, index_version)

    async def item(self, item_id: int, index_version: str) -> dict[str, Any] | None:
        return self._host.item(self._shard, item_id, index_version)

    async def thumbnail(self, item_id: int, index_version: str) -> bytes | None:
        return self._host.thumbnail(self._shard, item_id, index_version)

    async def loaded_versions(self) -> list[str]:
        return self._host.versions()


class LocalEmbedderClient:
    """`EmbedderClient` over an `EmbedderHost` in this process.

    Concurrent calls of one kind and version are gathered (``max_batch_size`` calls or
    ``batch_wait_timeout_s``) into one forward pass on ``executor``'s threads, as the
    embedder deployment's ``@serve.batch`` does.
    """

    remote = False

    def __init__(
        self,
        host: EmbedderHost,
        executor: concurrent.futures.Executor,
        *,
        max_batch_size: int,
        batch_wait_timeout_s: float,
    ) -> None:
        self._host = host
        self._executor = executor
        self._batcher: MicroBatcher[tuple[str, str], EmbedCall, np.ndarray | Exception] = MicroBatcher(
            run_batch=self._run_batch, max_batch_size=max_batch_size, wait_timeout_s=batch_wait_timeout_s
        )

    async def _run_batch(self, key: tuple[str, str], calls: list[EmbedCall]) -> list[np.ndarray | Exception]:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._host.embed_calls, calls)

    async def _embed(self, call: EmbedCall) -> np.ndarray:
        assert call.index_version is not None
        result = await self._batcher.submit((call.kind, call.index_version), call)
        if isinstance(result, Exception):
            raise result
        return result

    async def embed(self, image_bytes: bytes, index_version: str) -> np.ndarray:
        return await self._embed(EmbedCall(kind="image", data=image_bytes, index_version=index_version))

    async def embed_text(self, text: str, index_version: str) -> np.ndarray:
        return await self._embed(EmbedCall(kind="text", data=text, index_version=index_version))

    async def loaded_versions(self) -> list[str]:
        return self._host.versions()

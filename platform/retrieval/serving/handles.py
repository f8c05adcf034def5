"""The distributed layout's clients: shards and the embedder as Serve deployments, reached through handles.

A handle call reaches one replica. Serve wraps a replica's exception in a `RayTaskError`; the
platform's own errors are re-raised as themselves, and a call no replica could answer (it died,
its node is unreachable, Serve sheds load, the deployment failed) raises
`ShardUnavailableError`, which the shard pool retries once and otherwise counts as a missing
shard. A call whose caller gave up (the request's deadline) is cancelled at the replica too.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from retrieval.errors import RetrievalError
from retrieval.index.search_params import SearchParams
from retrieval.serving.errors import ShardUnavailableError
from retrieval.serving.replies import ShardHits

# Errors of a handle call that mean no replica could answer it; it may succeed on another.
REPLICA_GONE: tuple[type[BaseException], ...] = (
    RayActorError,
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)


async def call_replica(method: Any, *args: Any) -> Any:
    """Await a deployment call, re-raising the platform's own errors as themselves.

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
    except REPLICA_GONE as error:
        summary = (str(error).strip().splitlines() or [""])[0][:200]
        raise ShardUnavailableError(f"{type(error).__name__}: {summary}") from None
    except asyncio.CancelledError:
        response.cancel()
        raise


class HandleShardClient:
    """`ShardClient` over a `ShardDeployment` handle; ``batching`` picks the ``@serve.batch`` entry point."""

    remote = True

    def __init__(self, handle: DeploymentHandle, *, batching: bool = False) -> None:
        self._handle = handle
        self._batching = batching

    async def search(
        self, queries: np.ndarray, k: int, index_version: str, params: SearchParams | None = None
    ) -> ShardHits:
        method = self._handle.search_batched if self._batching else self._handle.search
        result: ShardHits = await call_replica(method, queries, k, index_version, params)
        return result

    async def vector(self, item_id: int, index_version: str) -> np.ndarray | None:
        result: np.ndarray | None = await call_replica(self._handle.vector, item_id, index_version)
        return result

    async def item(self, item_id: int, index_version: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = await call_replica(self._handle.item, item_id, index_version)
        return result

    async def thumbnail(self, item_id: int, index_version: str) -> bytes | None:
        result: bytes | None = await call_replica(self._handle.thumbnail, item_id, index_version)
        return result

    async def loaded_versions(self) -> list[str]:
        return list(await call_replica(self._handle.loaded_versions))


class HandleEmbedderClient:
    """`EmbedderClient` over an `EmbedderDeployment` handle; ``batching`` picks the ``@serve.batch`` entry points."""

    remote = True

    def __init__(self, handle: DeploymentHandle, *, batching: bool = False) -> None:
        self._handle = handle
        self._batching = batching

    async def embed(self, image_bytes: bytes, index_version: str) -> np.ndarray:
        method = self._handle.embed_batched if self._batching else self._handle.embed
        return np.asarray(await call_replica(method, image_bytes, index_version))

    async def embed_text(self, text: str, index_version: str) -> np.ndarray:
        method = self._handle.embed_text_batched if self._batching else self._handle.embed_text
        return np.asarray(await call_replica(method, text, index_version))

    async def loaded_versions(self) -> list[str]:
        return list(await call_replica(self._handle.loaded_versions))

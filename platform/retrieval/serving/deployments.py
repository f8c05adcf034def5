"""The Serve deployments: one per index shard, the embedder, and the HTTP ingress.

Every replica carries the index version it serves and every call names the version it
wants (ARCHITECTURE invariant 1): a replica asked for a version it does not hold raises
`VersionNotLoadedError`, which the ingress retries, and never answers from another version.
Shards keep their loaded versions in a dict keyed by version so that a rolling swap can
hold two at once.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from fastapi import FastAPI
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle

from retrieval.config import ServingSpec
from retrieval.errors import IndexIntegrityError, RetrievalError
from retrieval.index.manifest import read_manifest
from retrieval.index.object_store import local_index_path
from retrieval.index.shards import LoadedShard, load_shard
from retrieval.serving.errors import VersionNotLoadedError
from retrieval.serving.http import build_http_api
from retrieval.serving.images import decode_image
from retrieval.serving.service import SearchService

logger = logging.getLogger(__name__)


@serve.deployment
class ShardDeployment:
    """Serves one shard of the index, verified against its manifest checksums on load.

    Args:
        spec: the serving spec; ``spec.index`` names the manifest to load (an ``s3://`` one is
            fetched into the node's cache first, this shard's files only).
        shard: the shard number in the manifest.
    """

    def __init__(self, *, spec: ServingSpec, shard: int) -> None:
        manifest, version_dir = read_manifest(
            local_index_path(spec.index, endpoint_url=spec.endpoint_url, cache_dir=spec.cache_dir, shards=[shard])
        )
        self._shard = shard
        self._versions: dict[str, LoadedShard] = {
            manifest.index_version: load_shard(manifest=manifest, version_dir=version_dir, shard=shard)
        }

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
        loaded = self._loaded(index_version)
        scores, ids = loaded.search(queries, k)
        # The metadata travels with the scores, so the ingress needs no second round trip.
        items = {item_id: loaded.items[item_id] for item_id in np.unique(ids).tolist() if item_id >= 0}
        return {"index_version": index_version, "shard": self._shard, "scores": scores, "ids": ids, "items": items}

    def vector(self, item_id: int, index_version: str) -> np.ndarray | None:
        """The stored vector ``[D]`` of an id, or None when this shard does not hold it.

        None rather than an exception: an unknown id is an ordinary 404, not a replica error.
        """
        loaded = self._loaded(index_version)
        return loaded.vector(item_id) if item_id in loaded.items else None

    def item(self, item_id: int, index_version: str) -> dict[str, Any] | None:
        """The stored metadata of an id, or None when this shard does not hold it."""
        return self._loaded(index_version).items.get(item_id)


@serve.deployment
class EmbedderDeployment:
    """Embeds uploaded images with the model version that built the index.

    Args:
        spec: the serving spec; the model comes from the manifest that ``spec.index`` names.
    """

    def __init__(self, *, spec: ServingSpec) -> None:
        # Imported here, not at module level: it pulls in torch and MLflow, which the shard
        # and ingress replicas (same module) must not pay for in memory and start-up time.
        from retrieval.tracking.registry import load_embedder

        manifest, _ = read_manifest(
            local_index_path(spec.index, endpoint_url=spec.endpoint_url, cache_dir=spec.cache_dir, shards=())
        )
        self._index_version = manifest.index_version
        self._embedder = load_embedder(manifest.model.uri, tracking_uri=spec.tracking_uri)
        if self._embedder.dim != manifest.dim:
            raise IndexIntegrityError(
                f"model {manifest.model.uri} embeds into {self._embedder.dim} dimensions but index "
                f"{manifest.index_version} holds {manifest.dim}-dimensional vectors"
            )
        logger.info("embedder for index %s loaded %s", manifest.index_version, manifest.model.uri)

    def embed(self, image_bytes: bytes, index_version: str | None = None) -> np.ndarray:
        """The embedding ``[D]`` float32 of an encoded image.

        Args:
            image_bytes: the image file's bytes (any format Pillow reads).
            index_version: when given, the version the caller pinned; refused if this
                replica's model did not build it.

        Raises:
            NotAnImageError: the bytes are not a readable image.
            VersionNotLoadedError: ``index_version`` is not the one this replica serves.
        """
        if index_version is not None and index_version != self._index_version:
            raise VersionNotLoadedError(f"the embedder serves index version {self._index_version}, not {index_version}")
        image = decode_image(image_bytes)
        return np.asarray(self._embedder.embed_images([image])[0], dtype=np.float32)


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


@serve.deployment
@serve.ingress()
class SearchIngress:
    """The HTTP entry point: validates, fans out to every shard, merges the exact top-k.

    The FastAPI app is built per replica by `__serve_build_asgi_app__` (Serve's late-bound
    ingress) from a `SearchService`, so the same app runs in-process in tests.

    Args:
        spec: the serving spec; ``spec.index`` names the manifest whose version is pinned.
        shards: one handle per shard deployment, in manifest order.
        embedder: the embedder deployment's handle.
    """

    def __init__(self, *, spec: ServingSpec, shards: list[DeploymentHandle], embedder: DeploymentHandle) -> None:
        manifest, _ = read_manifest(
            local_index_path(spec.index, endpoint_url=spec.endpoint_url, cache_dir=spec.cache_dir, shards=())
        )
        self._service = SearchService(
            manifest=manifest,
            spec=spec,
            shards=[HandleShardClient(handle) for handle in shards],
            embedder=HandleEmbedderClient(embedder),
        )
        logger.info("ingress pinned to index %s (%s), %d shards", manifest.index_version, spec.index, len(shards))

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_http_api(self._service)

"""The typed values that travel between the serving layers (and across Ray calls, pickled).

A shard answers a search with `ShardHits`; the service answers a request with a `SearchReply`
(one query) or a `BatchSearchReply` (several), an `ItemReply` or a `Readiness`; the HTTP layer
turns them into JSON with `to_json`. The hits themselves stay plain dicts: each carries the
item's own stored fields (label, source, caption, ...), which differ per gallery and are
declared open in the OpenAPI schema.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from retrieval.index.search_params import SearchParams

Hit = dict[str, Any]


@dataclass(frozen=True)
class ShardCall:
    """One search of one shard: ``queries [q, D]``, ``k`` results each, in one version with one setting."""

    queries: np.ndarray
    k: int
    index_version: str
    params: SearchParams


@dataclass(frozen=True)
class ShardHits:
    """One shard's top-k for a ``[Q, D]`` block of queries, in one index version.

    Attributes:
        index_version: the version that answered (the caller checks it against the one it pinned).
        shard: the shard number.
        scores: ``[Q, k]`` float32 (Hamming distances for a binary index).
        ids: ``[Q, k]`` int64, ``-1`` for padding.
        items: id -> stored metadata, for every returned id.
    """

    index_version: str
    shard: int
    scores: np.ndarray
    ids: np.ndarray
    items: dict[int, dict[str, Any]]


@dataclass(frozen=True)
class ModelInfo:
    """The model version that embedded the index (and embeds the queries)."""

    name: str
    version: str
    uri: str

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "uri": self.uri}


@dataclass(frozen=True)
class SearchReply:
    """The answer to one query (``results``: hits best first) or to a batch (``results[i]`` answers query i).

    Attributes:
        model: the model version of the index that answered.
        index_version: that index version.
        modality: what the indexed items are, ``image`` or ``text``.
        k: results per query.
        params: the index settings used (the request's over the manifest's defaults).
        missing_shards: shards that missed the deadline or had no live replica (``partial``).
        results: the hits of one query, or of each query of a batch.
        batch: whether ``results`` holds one list per query.
    """

    model: ModelInfo
    index_version: str
    modality: str
    k: int
    params: dict[str, int]
    missing_shards: list[int]
    results: list[Hit] | list[list[Hit]]
    batch: bool = False

    @property
    def partial(self) -> bool:
        return bool(self.missing_shards)

    def hit_lists(self) -> list[list[Hit]]:
        """Every query's hits (one list for a single query)."""
        return self.results if self.batch else [self.results]  # type: ignore[list-item,return-value]

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model.to_json(),
            "index_version": self.index_version,
            "modality": self.modality,
            "k": self.k,
            "params": self.params,
            "partial": self.partial,
            "missing_shards": self.missing_shards,
            "results": self.results,
        }


@dataclass(frozen=True)
class ItemReply:
    """The stored metadata of one gallery item, with the version that holds it."""

    model: ModelInfo
    index_version: str
    item: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model.to_json(), "index_version": self.index_version, "item": self.item}


@dataclass(frozen=True)
class PartReadiness:
    """Whether one shard (or the embedder) holds the active version; ``error`` when it did not answer."""

    ready: bool
    versions: list[str] = field(default_factory=list)
    error: str | None = None
    shard: int | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {} if self.shard is None else {"shard": self.shard}
        body["ready"] = self.ready
        if self.error is None:
            body["versions"] = self.versions
        else:
            body["error"] = self.error
        return body


@dataclass(frozen=True)
class Readiness:
    """Whether every shard and the embedder hold the active version."""

    index_version: str
    shards: list[PartReadiness]
    embedder: PartReadiness
    layout: str

    @property
    def ready(self) -> bool:
        return all(shard.ready for shard in self.shards) and self.embedder.ready

    def not_ready_message(self) -> str:
        waiting = [str(shard.shard) for shard in self.shards if not shard.ready]
        parts = [f"shards {', '.join(waiting)} not ready"] if waiting else []
        if not self.embedder.ready:
            parts.append("the embedder is not ready")
        return f"not ready for index {self.index_version}: {'; '.join(parts) or 'see shards and embedder'}"

    def to_json(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "index_version": self.index_version,
            "layout": self.layout,
            "shards": [shard.to_json() for shard in self.shards],
            "embedder": self.embedder.to_json(),
        }

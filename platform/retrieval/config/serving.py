"""Serving settings: `ServingSpec`, the `args:` of the Ray Serve application. The application is in
`retrieval.serving` (built by `retrieval.serving.app`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from retrieval.config.base import StrictModel, _without_credentials
from retrieval.config.job import StorageSpec
from retrieval.config.validation import _validate


class ServingSpec(StrictModel):
    """Arguments of the Ray Serve application (the `args:` of a Serve config file)."""

    index: str = Field(description="index root folder (with CURRENT), a manifest.json, or s3://bucket/prefix")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint for an s3:// index")
    cache_dir: str | None = Field(None, description="cache of s3:// index shards; default $RETRIEVAL_CACHE/indices")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI without a user or password (null: MLFLOW_TRACKING_URI)"
    )
    layout: Literal["auto", "local", "distributed"] = Field(
        "auto",
        description=(
            "local: every ingress replica holds and searches all shards in-process (one hop per query); "
            "distributed: one Serve deployment per shard; auto: local when two copies of the index "
            "(a swap holds both) fit shard_memory_bytes, else distributed"
        ),
    )
    embedder_layout: Literal["local", "distributed"] = Field(
        "distributed",
        description="local: the ingress embeds image and text queries itself; distributed: an Embedder deployment",
    )
    ingress_replicas: int = Field(1, ge=1, description="replicas of the HTTP ingress (each holds every local shard)")
    ingress_num_cpus: float | None = Field(
        None,
        ge=0.0,
        description="CPUs per ingress replica (None: shard_num_cpus in the local layout, 0 in the distributed)",
    )
    shard_replicas: int = Field(1, ge=1, description="replicas per shard deployment (distributed layout)")
    max_replicas_per_node: int | None = Field(
        None,
        ge=1,
        description=(
            "most replicas of one deployment (ingress, each shard, embedder) on one node, so that losing a node "
            "loses at most this many of each (None: Serve places them freely)"
        ),
    )
    ingress_resources: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources each ingress replica needs, to place it on nodes that have them",
    )
    shard_resources: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources each shard replica needs (distributed layout), e.g. memory-heavy nodes",
    )
    embedder_replicas: int = Field(1, ge=1)
    shard_num_cpus: float = Field(0.5, ge=0.0)
    embedder_num_cpus: float = Field(0.5, ge=0.0)
    max_k: int = Field(100, ge=1)
    default_k: int = Field(10, ge=1)
    max_upload_bytes: int = Field(10_000_000, ge=1)
    max_image_pixels: int = Field(
        25_000_000, ge=1, description="most pixels (width x height, read from the header) of an uploaded image"
    )
    image_formats: list[str] = Field(
        default_factory=lambda: ["PNG", "JPEG", "WEBP", "GIF", "BMP"],
        min_length=1,
        description="image formats accepted in uploads (Pillow names); others are refused before decoding",
    )
    max_nprobe: int = Field(1024, ge=1, description="largest nprobe a request may ask for (IVF indices)")
    max_ef_search: int = Field(1024, ge=1, description="largest ef_search a request may ask for (HNSW indices)")
    body_read_timeout_s: float = Field(
        10.0, gt=0, description="how long a request's body may take to arrive, from the first byte read (408)"
    )
    shard_memory_bytes: int | None = Field(
        None,
        ge=1,
        description=(
            "memory budget of one replica holding shards: a shard replica, or an ingress replica in the local "
            "layout (None: the memory still available to it, container limits included)"
        ),
    )
    admin_token_env: str = Field("RETRIEVAL_ADMIN_TOKEN", min_length=1, description="env var holding the admin token")
    swap_timeout_s: float = Field(120.0, gt=0, description="how long a swap waits for every replica to load")
    batching: bool = Field(True, description="batch concurrent queries at the router, the shards and the embedder")
    max_batch_size: int = Field(32, ge=1, description="most queries in one batch (router, shards, embedder)")
    batch_wait_timeout_s: float = Field(
        0.002, ge=0.0, description="how long a batch waits for more queries before it goes out"
    )
    max_concurrent_batches: int | None = Field(
        None,
        ge=1,
        description=(
            "router batches searched at once; more queries wait for the next, which grows meanwhile "
            "(None: 1 in the local layout, whose searches share the replica's cores; no limit in the distributed)"
        ),
    )
    shard_timeout_s: float = Field(5.0, gt=0, description="per-request deadline for every shard's answer")
    on_shard_timeout: Literal["partial", "error"] = Field(
        "partial",
        description="a shard past the deadline: answer from the others with partial: true, or fail the request (504)",
    )
    max_query_vectors: int = Field(64, ge=1, description="most vectors in one POST /search/vectors request")
    query_token_env: str | None = Field(
        None, min_length=1, description="env var holding a bearer token the query endpoints require (None: open)"
    )
    cors_origins: list[str] = Field(default_factory=list, description="origins allowed by CORS ('*' for any)")
    mmap_shards: bool = Field(False, description="memory-map shard files (faiss IO_FLAG_MMAP) instead of reading them")
    health_check_period_s: float = Field(
        2.0, gt=0, description="how often Serve checks a replica; a dead one is replaced after the next check"
    )

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint_without_credentials(cls, value: str | None) -> str | None:
        return StorageSpec._endpoint_without_credentials(value)

    @field_validator("tracking_uri")
    @classmethod
    def _tracking_uri_without_credentials(cls, value: str | None) -> str | None:
        return _without_credentials(value)

    @field_validator("image_formats")
    @classmethod
    def _known_image_formats(cls, value: list[str]) -> list[str]:
        from PIL import Image

        Image.init()
        names = [name.upper() for name in value]
        unknown = sorted(set(names) - set(Image.OPEN))
        if unknown:
            raise ValueError(f"unknown image formats {unknown}; Pillow reads {sorted(Image.OPEN)}")
        return names

    @model_validator(mode="after")
    def _default_within_max(self) -> ServingSpec:
        if self.default_k > self.max_k:
            raise ValueError(f"default_k ({self.default_k}) is larger than max_k ({self.max_k})")
        if self.endpoint_url is not None and not self.index.startswith("s3://"):
            raise ValueError(f"endpoint_url applies to an s3:// index, but index is {self.index!r}")
        return self

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str) -> ServingSpec:
        return _validate(cls, data, source=source)

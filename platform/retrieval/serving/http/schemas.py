"""The request bodies and reply schemas of the HTTP API (pydantic; the OpenAPI document is built from them)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from retrieval.index.search_params import MAX_SETTING, SearchParams

# --------------------------------------------------------------------------- request bodies


class IndexParams(BaseModel):
    """Per-request index settings; a key the index does not know is a 400 (`SearchParams.from_mapping`)."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": False})

    nprobe: int | None = Field(
        None,
        description="IVF indices: inverted lists visited (1..nlist)",
        json_schema_extra={"minimum": 1, "maximum": MAX_SETTING},
    )
    ef_search: int | None = Field(
        None,
        description="HNSW indices: candidate list size of the graph search",
        json_schema_extra={"minimum": 1, "maximum": MAX_SETTING},
    )

    def search_params(self) -> SearchParams:
        """The validated settings.

        Raises:
            BadRequestError: an unknown key, or a value below 1 or above `MAX_SETTING`.
        """
        return SearchParams.from_mapping(self.model_dump(exclude_none=True))


def search_params(params: IndexParams | None) -> SearchParams | None:
    return None if params is None else params.search_params()


class VectorQuery(BaseModel):
    """Body of ``POST /search/vector``."""

    model_config = ConfigDict(extra="forbid")

    vector: list[float]
    k: int | None = None
    params: IndexParams | None = None


class VectorsQuery(BaseModel):
    """Body of ``POST /search/vectors``: a batch of query vectors ``[Q, D]`` answered together."""

    model_config = ConfigDict(extra="forbid")

    vectors: list[list[float]]
    k: int | None = None
    params: IndexParams | None = None


class TextQuery(BaseModel):
    """Body of ``POST /search/text``."""

    model_config = ConfigDict(extra="forbid")

    text: str
    k: int | None = None
    params: IndexParams | None = None


QUERY_FIELDS = ("vector", "id", "text", "image")


class SearchQuery(BaseModel):
    """Body of ``POST /search``: exactly one of ``vector``, ``id``, ``text``, ``image`` (base64)."""

    model_config = ConfigDict(extra="forbid")

    vector: list[float] | None = None
    id: int | None = None
    text: str | None = None
    image: str | None = None
    k: int | None = None
    params: IndexParams | None = None

    @model_validator(mode="after")
    def _exactly_one_query(self) -> SearchQuery:
        given = [name for name in QUERY_FIELDS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of {', '.join(QUERY_FIELDS)}; got {', '.join(given) if given else 'none'}"
            )
        return self


class SwapRequest(BaseModel):
    """Body of ``POST /admin/swap``."""

    model_config = ConfigDict(extra="forbid")

    index: str


class IdQuery(BaseModel):
    """Body of ``POST /search/id``."""

    model_config = ConfigDict(extra="forbid")

    id: int
    k: int | None = None
    params: IndexParams | None = None


# --------------------------------------------------------------------------- replies (OpenAPI)


class ErrorBody(BaseModel):
    type: str = Field(description="stable machine-readable kind, e.g. bad_request, not_found")
    message: str = Field(description="what is wrong, for people")


class ErrorReply(BaseModel):
    """Every error reply."""

    model_config = ConfigDict(extra="forbid")

    error: ErrorBody


class ModelInfo(BaseModel):
    """The model version that embedded the index (and embeds the queries)."""

    name: str
    version: str
    uri: str


class SearchHit(BaseModel):
    """One result, with the item's stored fields (e.g. label, source, caption) beside these."""

    model_config = ConfigDict(extra="allow")

    id: int
    score: float = Field(description="similarity, higher is better")
    distance: int | None = Field(None, description="binary indices: the Hamming distance")
    thumbnail_url: str | None = Field(None, description="relative to the application root; indices with thumbnails")


class SearchReply(BaseModel):
    """The answer to one query."""

    model: ModelInfo
    index_version: str
    modality: Literal["image", "text"] = Field(description="what the indexed items are")
    k: int
    partial: bool = Field(description="true when a shard missed the deadline; missing_shards names it")
    missing_shards: list[int]
    params: dict[str, int] = Field(description="the index settings given with the request")
    results: list[SearchHit]


class BatchSearchReply(BaseModel):
    """The answer to a batch of query vectors: ``results[i]`` answers ``vectors[i]``."""

    model: ModelInfo
    index_version: str
    modality: Literal["image", "text"]
    k: int
    partial: bool
    missing_shards: list[int]
    params: dict[str, int] | None = None
    results: list[list[SearchHit]]


class ItemReply(BaseModel):
    model: ModelInfo
    index_version: str
    item: dict[str, Any] = Field(description="the item's stored fields, with its id")


class VersionReply(BaseModel):
    model: dict[str, Any] = Field(description="name, version, uri and run_id of the model")
    index_version: str
    manifest: dict[str, Any] = Field(description="the whole index manifest")
    text_queries: bool = Field(description="whether POST /search/text can answer (a cross-modal model)")


class HealthReply(BaseModel):
    status: Literal["ok"]


class ReadinessReply(BaseModel):
    """Readiness; a 503 reply also carries ``error``."""

    model_config = ConfigDict(extra="allow")

    ready: bool
    index_version: str
    layout: Literal["local", "distributed"] = Field(description="where the shards are searched")
    shards: list[dict[str, Any]]
    embedder: dict[str, Any]
    error: ErrorBody | None = None


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for error statuses (all share `ErrorReply`)."""
    return {status: {"model": ErrorReply} for status in statuses}

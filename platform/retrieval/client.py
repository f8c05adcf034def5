"""A Python client for the search service's HTTP API, synchronous and asynchronous.

    from retrieval.client import RetrievalClient

    with RetrievalClient("http://127.0.0.1:8000", token=os.environ.get("RETRIEVAL_QUERY_TOKEN")) as client:
        result = client.search_image("query.png", k=5)
        for hit in result.hits:
            print(hit.id, hit.score, hit.fields.get("label"))

`AsyncRetrievalClient` has the same methods as coroutines. Replies come back as typed
results (`SearchResult`, `BatchSearchResult`, `Item`, `VersionInfo`, `Readiness`); an error
reply raises the `ApiError` subclass of its status, with the server's ``type`` and message.
A search is idempotent, so a 503 (no replica ready, e.g. while one restarts) or a dropped
connection is retried ``retries`` times with a growing pause; nothing else is.

The client speaks only HTTP (httpx): it imports neither Ray nor torch.
"""

from __future__ import annotations

import asyncio
import mimetypes
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from retrieval.errors import RetrievalError

DEFAULT_TIMEOUT_S = 30.0
_RETRY_STATUSES = frozenset({503})


# --------------------------------------------------------------------------- errors


class ApiError(RetrievalError):
    """An error reply from the service, or no reply at all (``status`` None).

    Attributes:
        status: the HTTP status.
        type: the reply's stable ``error.type`` (``bad_request``, ``not_found``, ...).
        message: the reply's message, for people.
    """

    def __init__(self, message: str, *, status: int | None = None, type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.message = message


class BadRequest(ApiError):
    """400, 413, 415 or 422: the request is malformed or too large (the message says which part)."""


class Unauthorized(ApiError):
    """401 or 403: a missing or wrong token, or a route switched off."""


class NotFound(ApiError):
    """404: no such item (or route)."""


class Conflict(ApiError):
    """409: e.g. a swap refused because another one runs."""


class Unavailable(ApiError):
    """503: no replica can answer now (retried before it is raised), or the service is unreachable."""


class DeadlineExceeded(ApiError):
    """408 or 504: the request or a shard missed its deadline."""


class ServerError(ApiError):
    """500: an internal error; the message carries the id under which the server logged it."""


_ERRORS: dict[int, type[ApiError]] = {
    400: BadRequest,
    413: BadRequest,
    415: BadRequest,
    422: BadRequest,
    401: Unauthorized,
    403: Unauthorized,
    404: NotFound,
    409: Conflict,
    503: Unavailable,
    408: DeadlineExceeded,
    504: DeadlineExceeded,
}


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Hit:
    """One result: the item's id, its score (higher is better) and its stored fields."""

    id: int
    score: float
    distance: int | None = None
    thumbnail_url: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Hit:
        known = {"id", "score", "distance", "thumbnail_url"}
        return cls(
            id=int(body["id"]),
            score=float(body["score"]),
            distance=body.get("distance"),
            thumbnail_url=body.get("thumbnail_url"),
            fields={key: value for key, value in body.items() if key not in known},
        )


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    uri: str

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> ModelInfo:
        return cls(name=str(body["name"]), version=str(body["version"]), uri=str(body["uri"]))


@dataclass(frozen=True)
class SearchResult:
    """The answer to one query; ``partial`` when a shard missed the deadline (``missing_shards``)."""

    model: ModelInfo
    index_version: str
    modality: str
    k: int
    partial: bool
    missing_shards: list[int]
    params: dict[str, int]
    hits: list[Hit]

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> SearchResult:
        return cls(
            model=ModelInfo.from_json(body["model"]),
            index_version=str(body["index_version"]),
            modality=str(body["modality"]),
            k=int(body["k"]),
            partial=bool(body["partial"]),
            missing_shards=[int(shard) for shard in body["missing_shards"]],
            params=dict(body.get("params") or {}),
            hits=[Hit.from_json(hit) for hit in body["results"]],
        )


@dataclass(frozen=True)
class BatchSearchResult:
    """The answer to a batch of vectors: ``hits[i]`` answers ``vectors[i]``."""

    model: ModelInfo
    index_version: str
    modality: str
    k: int
    partial: bool
    missing_shards: list[int]
    hits: list[list[Hit]]

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> BatchSearchResult:
        return cls(
            model=ModelInfo.from_json(body["model"]),
            index_version=str(body["index_version"]),
            modality=str(body["modality"]),
            k=int(body["k"]),
            partial=bool(body["partial"]),
            missing_shards=[int(shard) for shard in body["missing_shards"]],
            hits=[[Hit.from_json(hit) for hit in hits] for hits in body["results"]],
        )


@dataclass(frozen=True)
class Item:
    """A gallery item's stored fields (with its id), and the version that holds it."""

    model: ModelInfo
    index_version: str
    fields: dict[str, Any]

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Item:
        return cls(
            model=ModelInfo.from_json(body["model"]), index_version=str(body["index_version"]), fields=body["item"]
        )


@dataclass(frozen=True)
class VersionInfo:
    """The model and index version answering now, the whole manifest, and whether text queries work."""

    model: dict[str, Any]
    index_version: str
    manifest: dict[str, Any]
    text_queries: bool

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> VersionInfo:
        return cls(
            model=dict(body["model"]),
            index_version=str(body["index_version"]),
            manifest=dict(body["manifest"]),
            text_queries=bool(body.get("text_queries", False)),
        )


@dataclass(frozen=True)
class Readiness:
    """``GET /readyz``: whether every shard and the embedder hold the active version (never raises on 503)."""

    ready: bool
    index_version: str
    detail: dict[str, Any]


# --------------------------------------------------------------------------- requests (shared by both clients)


@dataclass(frozen=True)
class _Call:
    method: str
    path: str
    json: Any = None
    files: Any = None
    data: Any = None
    retry: bool = True


def _query(k: int | None, params: Mapping[str, int] | None) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if k is not None:
        body["k"] = k
    if params:
        body["params"] = dict(params)
    return body


def _image_upload(image: str | Path | bytes | BinaryIO, k: int | None, params: Mapping[str, int] | None) -> _Call:
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise BadRequest(f"{path}: no such image file")
        content, name = path.read_bytes(), path.name
    elif isinstance(image, bytes):
        content, name = image, "query"
    else:
        content, name = image.read(), Path(getattr(image, "name", "query")).name
    media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    form: dict[str, str] = {}
    if k is not None:
        form["k"] = str(k)
    for key, value in (params or {}).items():
        form[key] = str(value)
    return _Call("POST", "/search/image", files={"file": (name, content, media_type)}, data=form)


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        detail = response.json()["error"]
        kind, message = str(detail["type"]), str(detail["message"])
    except (ValueError, KeyError, TypeError):
        kind, message = None, response.text.strip() or response.reason_phrase
    error_class = _ERRORS.get(response.status_code, ServerError if response.status_code >= 500 else ApiError)
    raise error_class(
        f"{response.request.method} {response.request.url.path}: HTTP {response.status_code}"
        f"{' ' + kind if kind else ''}: {message}",
        status=response.status_code,
        type=kind,
    )


def _attempts(call: _Call, retries: int) -> list[tuple[bool, float]]:
    """``(last, pause after it)`` per attempt: a retryable call gets ``retries`` more, pausing 0.2 s, 0.4 s, ..."""
    count = retries + 1 if call.retry else 1
    return [(attempt == count - 1, 0.2 * 2**attempt) for attempt in range(count)]


def _no_reply(call: _Call, error: Exception) -> Unavailable:
    return Unavailable(f"{call.method} {call.path}: no reply: {error}")


def _readiness(response: httpx.Response) -> Readiness:
    """``GET /readyz``'s reply: 200 and 503 both carry the readiness; anything else is an error."""
    if response.status_code not in (200, 503):
        _raise_for(response)
    body = response.json()
    return Readiness(ready=bool(body["ready"]), index_version=str(body["index_version"]), detail=body)


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token.strip()}"} if token else {}


class _Api:
    """What both clients share: the routes, their bodies and their replies."""

    @staticmethod
    def vector(vector: Sequence[float], k: int | None, params: Mapping[str, int] | None) -> _Call:
        return _Call("POST", "/search/vector", json={"vector": [float(x) for x in vector], **_query(k, params)})

    @staticmethod
    def vectors(vectors: Sequence[Sequence[float]], k: int | None, params: Mapping[str, int] | None) -> _Call:
        rows = [[float(x) for x in row] for row in vectors]
        return _Call("POST", "/search/vectors", json={"vectors": rows, **_query(k, params)})

    @staticmethod
    def by_id(item_id: int, k: int | None, params: Mapping[str, int] | None) -> _Call:
        return _Call("POST", "/search/id", json={"id": int(item_id), **_query(k, params)})

    @staticmethod
    def text(text: str, k: int | None, params: Mapping[str, int] | None) -> _Call:
        return _Call("POST", "/search/text", json={"text": text, **_query(k, params)})


# --------------------------------------------------------------------------- the clients


class RetrievalClient:
    """A synchronous client (one connection pool; use it as a context manager or call `close`).

    Args:
        url: the application's base URL (with its route prefix), e.g. ``http://127.0.0.1:8000``.
        token: the query token, when the service requires one.
        timeout_s: per-request timeout.
        retries: how many times a 503 or a dropped connection is retried.
        transport: an httpx transport (tests pass an ASGI or mock transport).
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retries: int = 2,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._retries = retries
        self._http = httpx.Client(
            base_url=url.rstrip("/"),
            headers=_headers(token),
            timeout=timeout_s,
            transport=transport,
            follow_redirects=False,
        )

    def __enter__(self) -> RetrievalClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def search_vector(
        self, vector: Sequence[float], *, k: int | None = None, params: Mapping[str, int] | None = None
    ) -> SearchResult:
        return SearchResult.from_json(self._send(_Api.vector(vector, k, params)))

    def search_vectors(
        self, vectors: Sequence[Sequence[float]], *, k: int | None = None, params: Mapping[str, int] | None = None
    ) -> BatchSearchResult:
        return BatchSearchResult.from_json(self._send(_Api.vectors(vectors, k, params)))

    def search_id(self, item_id: int, *, k: int | None = None, params: Mapping[str, int] | None = None) -> SearchResult:
        return SearchResult.from_json(self._send(_Api.by_id(item_id, k, params)))

    def search_text(self, text: str, *, k: int | None = None, params: Mapping[str, int] | None = None) -> SearchResult:
        return SearchResult.from_json(self._send(_Api.text(text, k, params)))

    def search_image(
        self,
        image: str | Path | bytes | BinaryIO,
        *,
        k: int | None = None,
        params: Mapping[str, int] | None = None,
    ) -> SearchResult:
        return SearchResult.from_json(self._send(_image_upload(image, k, params)))

    def item(self, item_id: int) -> Item:
        return Item.from_json(self._send(_Call("GET", f"/items/{int(item_id)}")))

    def version(self) -> VersionInfo:
        return VersionInfo.from_json(self._send(_Call("GET", "/version")))

    def readiness(self) -> Readiness:
        return _readiness(self._request(_Call("GET", "/readyz", retry=False)))

    def _send(self, call: _Call) -> Any:
        response = self._request(call)
        _raise_for(response)
        return response.json()

    def _request(self, call: _Call) -> httpx.Response:
        for last, pause in _attempts(call, self._retries):
            try:
                response = self._http.request(call.method, call.path, json=call.json, files=call.files, data=call.data)
            except httpx.TransportError as error:
                if last:
                    raise _no_reply(call, error) from None
            else:
                if last or response.status_code not in _RETRY_STATUSES:
                    return response
            time.sleep(pause)
        raise AssertionError("unreachable")


class AsyncRetrievalClient:
    """The asynchronous client: the same methods as `RetrievalClient`, as coroutines."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retries: int = 2,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._retries = retries
        self._http = httpx.AsyncClient(
            base_url=url.rstrip("/"),
            headers=_headers(token),
            timeout=timeout_s,
            transport=transport,
            follow_redirects=False,
        )

    async def __aenter__(self) -> AsyncRetrievalClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def search_vector(
        self, vector: Sequence[float], *, k: int | None = None, params: Mapping[str, int] | None = None
    ) -> SearchResult:
        return SearchResult.from_json(await self._send(_Api.vector(vector, k, params)))

    async def search_vectors(
        self, vectors: Sequence[Sequence[float]], *, k: int | None = None, params: Mapping[str, int] | None = None
    ) -> BatchSearchResult:
        return BatchSearchResult.from_json(await self._send(_Api.vectors(vectors, k, params)))

    async def search_id(
        self, item_id: int, *, k: int | None = None, params: Mapping[str, int] | None = None
    ) -> SearchResult:
        return SearchResult.from_json(await self._send(_Api.by_id(item_id, k, params)))

    async def search_text(
        self, text: str, *, k: int | None = None, params: Mapping[str, int] | None = None
    ) -> SearchResult:
        return SearchResult.from_json(await self._send(_Api.text(text, k, params)))

    async def search_image(
        self,
        image: str | Path | bytes | BinaryIO,
        *,
        k: int | None = None,
        params: Mapping[str, int] | None = None,
    ) -> SearchResult:
        return SearchResult.from_json(await self._send(_image_upload(image, k, params)))

    async def item(self, item_id: int) -> Item:
        return Item.from_json(await self._send(_Call("GET", f"/items/{int(item_id)}")))

    async def version(self) -> VersionInfo:
        return VersionInfo.from_json(await self._send(_Call("GET", "/version")))

    async def readiness(self) -> Readiness:
        return _readiness(await self._request(_Call("GET", "/readyz", retry=False)))

    async def _send(self, call: _Call) -> Any:
        response = await self._request(call)
        _raise_for(response)
        return response.json()

    async def _request(self, call: _Call) -> httpx.Response:
        for last, pause in _attempts(call, self._retries):
            try:
                response = await self._http.request(
                    call.method, call.path, json=call.json, files=call.files, data=call.data
                )
            except httpx.TransportError as error:
                if last:
                    raise _no_reply(call, error) from None
            else:
                if last or response.status_code not in _RETRY_STATUSES:
                    return response
            await asyncio.sleep(pause)
        raise AssertionError("unreachable")

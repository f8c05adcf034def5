"""A Python client for the search service's HTTP API, synchronous and asynchronous.

    from retrieval.client import RetrievalClient

    with RetrievalClient("http://127.0.0.1:8000", token=os.environ.get("RETRIEVAL_QUERY_TOKEN")) as client:
        result = client.search_image("query.png", k=5)
        for hit in result.hits:
            print(hit.id, hit.score, hit.fields.get("label"))

`AsyncRetrievalClient` has the same methods as coroutines. Every route of the API has a
method (a test compares them with the application's routes, so the two cannot drift): the
searches, items and thumbnails, version, liveness, readiness and metrics, and with an
``admin_token`` the rolling swap, its abort and the swap status. Replies come back as typed
results (`SearchResult`, `BatchSearchResult`, `Item`, `VersionInfo`, `Readiness`); an error
reply raises the `ApiError` subclass of its status, with the server's ``type`` and message.
A search is idempotent, so a 503 (no replica ready, e.g. while one restarts) or a dropped
connection is retried ``retries`` times with a growing pause; nothing else is. A redirect is
never followed (it would carry the token elsewhere): it raises `ApiError` naming where it pointed.

The client speaks only HTTP (httpx): it imports neither Ray nor torch.
"""

from __future__ import annotations

import asyncio
import base64
import mimetypes
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import httpx

from retrieval.errors import RetrievalError

DEFAULT_TIMEOUT_S = 30.0
SWAP_TIMEOUT_S = 300.0
_RETRY_STATUSES = frozenset({503})


# --------------------------------------------------------------------------- errors


class ApiError(RetrievalError):
    """An error reply from the service, or no reply at all (``status`` None).

    Attributes:
        status: the HTTP status.
        type: the reply's stable ``error.type`` (``bad_request``, ``not_found``, ...).
        message: the whole message (the request, the status, the type and the reason).
        reason: the server's own message (or why no reply came back), for people.
    """

    def __init__(
        self, message: str, *, status: int | None = None, type: str | None = None, reason: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.message = message
        self.reason = reason if reason is not None else message


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
    """One request: its route, body, and whether it may be retried (searches and reads may; admin calls not)."""

    method: str
    path: str
    json: Any = None
    files: Any = None
    data: Any = None
    retry: bool = True
    admin: bool = False
    timeout_s: float | None = None


Reply = Literal["json", "bytes", "text"]


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


def _image_bytes(image: str | Path | bytes | BinaryIO) -> bytes:
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise BadRequest(f"{path}: no such image file")
        return path.read_bytes()
    return image if isinstance(image, bytes) else image.read()


def _raise_for(response: httpx.Response) -> None:
    where = f"{response.request.method} {response.request.url.path}"
    if response.is_redirect:
        location = response.headers.get("location", "?")
        raise ApiError(
            f"{where}: HTTP {response.status_code} redirecting to {location}; not following it with the token "
            "(give the application's own URL)",
            status=response.status_code,
            reason=f"redirect to {location}",
        )
    if response.status_code < 400:
        return
    try:
        detail = response.json()["error"]
        kind, message = str(detail["type"]), str(detail["message"])
    except (ValueError, KeyError, TypeError):
        kind, message = None, response.text.strip() or response.reason_phrase
    error_class = _ERRORS.get(response.status_code, ServerError if response.status_code >= 500 else ApiError)
    raise error_class(
        f"{where}: HTTP {response.status_code}{' ' + kind if kind else ''}: {message}",
        status=response.status_code,
        type=kind,
        reason=message,
    )


def _decode(response: httpx.Response, reply: Reply) -> Any:
    _raise_for(response)
    if reply == "bytes":
        return response.content
    if reply == "text":
        return response.text
    return response.json()


def _attempts(call: _Call, retries: int) -> list[tuple[bool, float]]:
    """``(last, pause after it)`` per attempt: a retryable call gets ``retries`` more, pausing 0.2 s, 0.4 s, ..."""
    count = retries + 1 if call.retry else 1
    return [(attempt == count - 1, 0.2 * 2**attempt) for attempt in range(count)]


def _no_reply(call: _Call, error: Exception) -> Unavailable:
    return Unavailable(f"{call.method} {call.path}: no reply: {error}", reason=f"no reply: {error}")


def _readiness(response: httpx.Response) -> Readiness:
    """``GET /readyz``'s reply: 200 and 503 both carry the readiness; anything else is an error."""
    if response.status_code not in (200, 503):
        _raise_for(response)
    body = response.json()
    return Readiness(ready=bool(body["ready"]), index_version=str(body["index_version"]), detail=body)


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token.strip()}"} if token else {}


def _request_options(call: _Call, admin_token: str | None) -> dict[str, Any]:
    """httpx keyword arguments of one call: its body, and for admin routes the admin token."""
    options: dict[str, Any] = {"json": call.json, "files": call.files, "data": call.data}
    if call.admin:
        if not admin_token:
            raise Unauthorized(
                f"{call.method} {call.path} is an admin route: create the client with admin_token=... "
                "(the server's RETRIEVAL_ADMIN_TOKEN)",
                status=None,
                type="unauthorized",
            )
        options["headers"] = _headers(admin_token)
    if call.timeout_s is not None:
        options["timeout"] = call.timeout_s
    return options


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

    @staticmethod
    def search(
        *,
        vector: Sequence[float] | None,
        item_id: int | None,
        text: str | None,
        image: str | Path | bytes | BinaryIO | None,
        k: int | None,
        params: Mapping[str, int] | None,
    ) -> _Call:
        """``POST /search``: exactly one of a vector, a gallery id, a text or an image (sent as base64)."""
        given = {"vector": vector, "id": item_id, "text": text, "image": image}
        named = [name for name, value in given.items() if value is not None]
        if len(named) != 1:
            raise BadRequest(f"search takes exactly one of vector, item_id, text or image; got {named or 'none'}")
        body: dict[str, Any] = _query(k, params)
        if vector is not None:
            body["vector"] = [float(x) for x in vector]
        elif item_id is not None:
            body["id"] = int(item_id)
        elif text is not None:
            body["text"] = text
        else:
            assert image is not None
            body["image"] = base64.b64encode(_image_bytes(image)).decode("ascii")
        return _Call("POST", "/search", json=body)

    @staticmethod
    def item(item_id: int) -> _Call:
        return _Call("GET", f"/items/{int(item_id)}")

    @staticmethod
    def thumbnail(item_id: int) -> _Call:
        return _Call("GET", f"/items/{int(item_id)}/thumbnail")

    @staticmethod
    def swap(index: str, timeout_s: float) -> _Call:
        # Not retried: a second swap request while the first runs is refused (409), not repeated.
        return _Call("POST", "/admin/swap", json={"index": index}, retry=False, admin=True, timeout_s=timeout_s)

    ABORT = _Call("POST", "/admin/swap/abort", retry=False, admin=True)
    STATUS = _Call("GET", "/admin/status", admin=True)
    VERSION = _Call("GET", "/version")
    HEALTH = _Call("GET", "/healthz")
    READY = _Call("GET", "/readyz", retry=False)
    METRICS = _Call("GET", "/metrics")


# --------------------------------------------------------------------------- the clients


class RetrievalClient:
    """A synchronous client (one connection pool; use it as a context manager or call `close`).

    Args:
        url: the application's base URL (with its route prefix), e.g. ``http://127.0.0.1:8000``.
        token: the query token, when the service requires one.
        admin_token: the admin token, for the swap routes (the server's ``RETRIEVAL_ADMIN_TOKEN``).
        timeout_s: per-request timeout (a swap waits ``timeout_s`` of its own call).
        retries: how many times a 503 or a dropped connection is retried.
        transport: an httpx transport (tests pass an ASGI or mock transport).
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        admin_token: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retries: int = 2,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._retries = retries
        self._admin_token = admin_token
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
        """``POST /search/vector``: the ``k`` nearest items to a vector of the index's dimension."""
        return SearchResult.from_json(self._send(_Api.vector(vector, k, params)))

    def search_vectors(
        self, vectors: Sequence[Sequence[float]], *, k: int | None = None, params: Mapping[str, int] | None = None
    ) -> BatchSearchResult:
        """``POST /search/vectors``: a batch of vectors in one request; ``hits[i]`` answers ``vectors[i]``."""
        return BatchSearchResult.from_json(self._send(_Api.vectors(vectors, k, params)))

    def search_id(self, item_id: int, *, k: int | None = None, params: Mapping[str, int] | None = None) -> SearchResult:
        """``POST /search/id``: the items nearest to a gallery item (itself excluded)."""
        return SearchResult.from_json(self._send(_Api.by_id(item_id, k, params)))

    def search_text(self, text: str, *, k: int | None = None, params: Mapping[str, int] | None = None) -> SearchResult:
        """``POST /search/text``: images matching a sentence (cross-modal models)."""
        return SearchResult.from_json(self._send(_Api.text(text, k, params)))

    def search_image(
        self,
        image: str | Path | bytes | BinaryIO,
        *,
        k: int | None = None,
        params: Mapping[str, int] | None = None,
    ) -> SearchResult:
        """``POST /search/image``: an image file, its bytes or an open binary file, uploaded as a form."""
        return SearchResult.from_json(self._send(_image_upload(image, k, params)))

    def search(
        self,
        *,
        vector: Sequence[float] | None = None,
        item_id: int | None = None,
        text: str | None = None,
        image: str | Path | bytes | BinaryIO | None = None,
        k: int | None = None,
        params: Mapping[str, int] | None = None,
    ) -> SearchResult:
        """``POST /search``: one JSON route for exactly one of a vector, a gallery id, a text or an image."""
        call = _Api.search(vector=vector, item_id=item_id, text=text, image=image, k=k, params=params)
        return SearchResult.from_json(self._send(call))

    def item(self, item_id: int) -> Item:
        """``GET /items/{id}``: a gallery item's stored fields."""
        return Item.from_json(self._send(_Api.item(item_id)))

    def thumbnail(self, item_id: int) -> bytes:
        """``GET /items/{id}/thumbnail``: the item's PNG thumbnail (`NotFound` for an index without thumbnails)."""
        content: bytes = self._send(_Api.thumbnail(item_id), reply="bytes")
        return content

    def version(self) -> VersionInfo:
        """``GET /version``: the model and index version answering now, and the manifest."""
        return VersionInfo.from_json(self._send(_Api.VERSION))

    def health(self) -> bool:
        """``GET /healthz``: True when the ingress answers (raises `Unavailable` when nothing does)."""
        body = self._send(_Api.HEALTH)
        return bool(body["status"] == "ok")

    def readiness(self) -> Readiness:
        """``GET /readyz``: whether every shard and the embedder hold the active version (a 503 is not an error)."""
        return _readiness(self._request(_Api.READY))

    def metrics(self) -> str:
        """``GET /metrics``: the Prometheus text exposition."""
        text: str = self._send(_Api.METRICS, reply="text")
        return text

    def swap(self, index: str, *, timeout_s: float = SWAP_TIMEOUT_S) -> dict[str, Any]:
        """``POST /admin/swap`` (admin token): roll every replica to ``index``; returns the server's summary.

        It returns once every replica serves the new version (``{"from", "to", "model", "duration_s",
        "replicas"}``); a refused or failed swap raises (`Conflict` with type ``swap_failed`` or
        ``swap_in_progress``) while the old version keeps serving. Never retried.
        """
        summary: dict[str, Any] = self._send(_Api.swap(index, timeout_s))
        return summary

    def abort_swap(self) -> dict[str, Any]:
        """``POST /admin/swap/abort`` (admin token): cancel the swap in progress, or roll it back after its flip."""
        state: dict[str, Any] = self._send(_Api.ABORT)
        return state

    def swap_status(self) -> dict[str, Any]:
        """``GET /admin/status`` (admin token): active, prepared and retiring versions, every replica's state."""
        state: dict[str, Any] = self._send(_Api.STATUS)
        return state

    def _send(self, call: _Call, *, reply: Reply = "json") -> Any:
        return _decode(self._request(call), reply)

    def _request(self, call: _Call) -> httpx.Response:
        options = _request_options(call, self._admin_token)
        for last, pause in _attempts(call, self._retries):
            try:
                response = self._http.request(call.method, call.path, **options)
            except httpx.TransportError as error:
                if last:
                    raise _no_reply(call, error) from None
            else:
                if last or response.status_code not in _RETRY_STATUSES:
                    return response
            time.sleep(pause)
        raise AssertionError("unreachable")


class AsyncRetrievalClient:
    """The asynchronous client: the same methods as `RetrievalClient`, as coroutines.

    Args:
        url: the application's base URL (with its route prefix), e.g. ``http://127.0.0.1:8000``.
        token: the query token, when the service requires one.
        admin_token: the admin token, for the swap routes (the server's ``RETRIEVAL_ADMIN_TOKEN``).
        timeout_s: per-request timeout (a swap waits ``timeout_s`` of its own call).
        retries: how many times a 503 or a dropped connection is retried.
        transport: an httpx transport (tests pass an ASGI or mock transport).
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        admin_token: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retries: int = 2,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._retries = retries
        self._admin_token = admin_token
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
        """``POST /search/vector``: the ``k`` nearest items to a vector of the index's dimension."""
        return SearchResult.from_json(await self._send(_Api.vector(vector, k, params)))

    async def search_vectors(
        self, vectors: Sequence[Sequence[float]], *, k: int | None = None, params: Mapping[str, int] | None = None
    ) -> BatchSearchResult:
        """``POST /search/vectors``: a batch of vectors in one request; ``hits[i]`` answers ``vectors[i]``."""
        return BatchSearchResult.from_json(await self._send(_Api.vectors(vectors, k, params)))

    async def search_id(
        self, item_id: int, *, k: int | None = None, params: Mapping[str, int] | None = None
    ) -> SearchResult:
        """``POST /search/id``: the items nearest to a gallery item (itself excluded)."""
        return SearchResult.from_json(await self._send(_Api.by_id(item_id, k, params)))

    async def search_text(
        self, text: str, *, k: int | None = None, params: Mapping[str, int] | None = None
    ) -> SearchResult:
        """``POST /search/text``: images matching a sentence (cross-modal models)."""
        return SearchResult.from_json(await self._send(_Api.text(text, k, params)))

    async def search_image(
        self,
        image: str | Path | bytes | BinaryIO,
        *,
        k: int | None = None,
        params: Mapping[str, int] | None = None,
    ) -> SearchResult:
        """``POST /search/image``: an image file, its bytes or an open binary file, uploaded as a form."""
        return SearchResult.from_json(await self._send(_image_upload(image, k, params)))

    async def search(
        self,
        *,
        vector: Sequence[float] | None = None,
        item_id: int | None = None,
        text: str | None = None,
        image: str | Path | bytes | BinaryIO | None = None,
        k: int | None = None,
        params: Mapping[str, int] | None = None,
    ) -> SearchResult:
        """``POST /search``: one JSON route for exactly one of a vector, a gallery id, a text or an image."""
        call = _Api.search(vector=vector, item_id=item_id, text=text, image=image, k=k, params=params)
        return SearchResult.from_json(await self._send(call))

    async def item(self, item_id: int) -> Item:
        """``GET /items/{id}``: a gallery item's stored fields."""
        return Item.from_json(await self._send(_Api.item(item_id)))

    async def thumbnail(self, item_id: int) -> bytes:
        """``GET /items/{id}/thumbnail``: the item's PNG thumbnail (`NotFound` for an index without thumbnails)."""
        content: bytes = await self._send(_Api.thumbnail(item_id), reply="bytes")
        return content

    async def version(self) -> VersionInfo:
        """``GET /version``: the model and index version answering now, and the manifest."""
        return VersionInfo.from_json(await self._send(_Api.VERSION))

    async def health(self) -> bool:
        """``GET /healthz``: True when the ingress answers (raises `Unavailable` when nothing does)."""
        body = await self._send(_Api.HEALTH)
        return bool(body["status"] == "ok")

    async def readiness(self) -> Readiness:
        """``GET /readyz``: whether every shard and the embedder hold the active version (a 503 is not an error)."""
        return _readiness(await self._request(_Api.READY))

    async def metrics(self) -> str:
        """``GET /metrics``: the Prometheus text exposition."""
        text: str = await self._send(_Api.METRICS, reply="text")
        return text

    async def swap(self, index: str, *, timeout_s: float = SWAP_TIMEOUT_S) -> dict[str, Any]:
        """``POST /admin/swap`` (admin token): roll every replica to ``index``; returns the server's summary.

        It returns once every replica serves the new version (``{"from", "to", "model", "duration_s",
        "replicas"}``); a refused or failed swap raises (`Conflict` with type ``swap_failed`` or
        ``swap_in_progress``) while the old version keeps serving. Never retried.
        """
        summary: dict[str, Any] = await self._send(_Api.swap(index, timeout_s))
        return summary

    async def abort_swap(self) -> dict[str, Any]:
        """``POST /admin/swap/abort`` (admin token): cancel the swap in progress, or roll it back after its flip."""
        state: dict[str, Any] = await self._send(_Api.ABORT)
        return state

    async def swap_status(self) -> dict[str, Any]:
        """``GET /admin/status`` (admin token): active, prepared and retiring versions, every replica's state."""
        state: dict[str, Any] = await self._send(_Api.STATUS)
        return state

    async def _send(self, call: _Call, *, reply: Reply = "json") -> Any:
        return _decode(await self._request(call), reply)

    async def _request(self, call: _Call) -> httpx.Response:
        options = _request_options(call, self._admin_token)
        for last, pause in _attempts(call, self._retries):
            try:
                response = await self._http.request(call.method, call.path, **options)
            except httpx.TransportError as error:
                if last:
                    raise _no_reply(call, error) from None
            else:
                if last or response.status_code not in _RETRY_STATUSES:
                    return response
            await asyncio.sleep(pause)
        raise AssertionError("unreachable")

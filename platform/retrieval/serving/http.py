"""The HTTP API of the search service (FastAPI), over a `SearchService`, and its search page.

Endpoints::

    POST /search            JSON {"text" | "vector" | "id" | "image": ..., "k": int?, "params": {...}?},
                            exactly one query field; "image" is the image file base64-encoded
    POST /search/vector     JSON {"vector": [float, ...], "k": int?, "params": {...}?}
    POST /search/vectors    JSON {"vectors": [[float, ...], ...], "k": int?, "params": {...}?}  a batch:
                            "results" holds one list of hits per vector, in order
    POST /search/image      multipart form: file (image bytes), k, nprobe, ef_search (optional form fields)
    POST /search/id         JSON {"id": int, "k": int?, "params": {...}?}  neighbours, excluding the item
    POST /search/text       JSON {"text": str, "k": int?, "params": {...}?}  cross-modal models: search by a sentence
    GET  /items/{id}        the stored metadata of one gallery item
    GET  /items/{id}/thumbnail   its thumbnail (image/png), for indices built with thumbnails
    GET  /healthz           {"status": "ok"}: the ingress is alive (liveness)
    GET  /readyz            200 when every shard and the embedder hold the active version, else 503;
                            the body says which: {"ready", "index_version", "shards": [...], "embedder": {...}}
    GET  /version           {"model": {...}, "index_version": str, "manifest": {...}, "text_queries": bool}
    GET  /metrics           Prometheus text (`retrieval.serving.metrics`)
    GET  /                  the search page (HTML; its script and style under /ui/)
    POST /admin/swap        JSON {"index": "<version name under the served root> | <manifest path or s3:// URI>"}
                            -> {"from", "to", "model", "duration_s", "replicas"}   (rolling swap)
    GET  /admin/status      {"active", "model", "prepared", "retiring", "epoch", "replicas": {...}}

``params`` holds per-request index settings, ``{"nprobe": int}`` for IVF indices and
``{"ef_search": int}`` for HNSW ones (`retrieval.index.search_params.SearchParams`); a setting
the index does not have, an unknown key or a value below 1 is a 400.

Authentication. The admin routes need ``Authorization: Bearer <token>``, the token being the
value of the environment variable ``ServingSpec.admin_token_env`` (default
``RETRIEVAL_ADMIN_TOKEN``) on the ingress replica, read per request; when that variable is unset
or empty they are disabled (403). When ``ServingSpec.query_token_env`` names a variable, the
query routes (``/search*``, ``/items*``, ``/version``) need ``Authorization: Bearer <its value>``
too (401 without it; 403 while the variable is unset on the replica). ``/healthz``, ``/readyz``,
``/metrics``, ``/openapi.json`` and the search page stay open: probes and scrapers carry no
token, and the page asks the user for one. ``ServingSpec.cors_origins`` lists the origins a
browser may call the API from (GET and POST, headers Authorization and Content-Type).

Limits. ``k`` is 1..``max_k``; an uploaded image is at most ``max_upload_bytes``; a batch holds at
most ``max_query_vectors`` vectors; a text at most 10,000 characters; the body of a POST at most
``max_upload_bytes`` plus 64 KiB of multipart overhead (``/search/image``) or 4/3 of it plus
64 KiB (JSON, where an image travels base64-encoded), refused from its Content-Length before it
is read, or as soon as a streamed body passes the limit. ``nprobe`` and ``ef_search`` are at most
2**31 - 1 (Faiss takes them as C ints).

Every search reply is ``{"model": {"name", "version", "uri"}, "index_version", "modality", "k",
"partial", "missing_shards", "params", "results": [{"id", "score", <item fields, e.g. label,
source>}, ...]}``, best first (highest ``score``); ``modality`` ("image" or "text") says what
the indexed items are; ``partial`` is true when a shard missed the deadline and the answer
comes from the others (``missing_shards`` names them). A binary (hashing) index also gives each
result its Hamming ``distance``, with ``score = 1 - 2 * distance / bits`` (the cosine of the
two ±1 codes, in [-1, 1]); its vector queries hold one real value per bit, of which only the
sign counts. When the index holds thumbnails each result has ``"thumbnail_url":
"items/<id>/thumbnail"``, relative to the application's root (so it holds under any route prefix).

Every error reply is ``{"error": {"type": str, "message": str}}`` (ARCHITECTURE invariant 4):

    422 validation_error    the request does not fit the schema: malformed JSON, a missing
                            or unknown field, a value of the wrong type, not exactly one
                            query field in POST /search (FastAPI's RequestValidationError,
                            reshaped)
    400 bad_request         well-formed but invalid: wrong vector length, non-finite values,
                            k outside 1..max_k, an empty or blank text, a text query to a model
                            that embeds images only, an "image" that is not base64, bad params
    400 not_an_image        the upload is not a readable image
    413 payload_too_large   the upload is bigger than max_upload_bytes, a body over its limit,
                            more than max_query_vectors vectors, or a text longer than
                            MAX_TEXT_CHARS (10,000) characters
    404 not_found           unknown gallery id, an item without a thumbnail, or unknown route
    405 method_not_allowed  a known route with the wrong method
    503 version_unavailable no replica holds the pinned index version (retry later)
    503 shard_unavailable   a shard has no live replica (retry later)
    503 not_ready           GET /readyz while not ready (with the readiness fields beside "error")
    504 shard_timeout       a shard missed the deadline and the spec says on_shard_timeout: error
    401 unauthorized        a protected route without a bearer token, or with a wrong one
    403 forbidden           admin routes (or, with query_token_env, query routes) are disabled:
                            no token configured on the server
    409 swap_in_progress    another swap is running
    409 swap_failed         the swap was refused or aborted (the reason); the old version serves on
    422 bad_index_reference the swap names no readable index version / manifest
    500 internal_error      anything else (a bug); the replica keeps serving
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from retrieval import __version__
from retrieval.config import ServingSpec
from retrieval.errors import BadRequestError, RetrievalError
from retrieval.index.search_params import MAX_SETTING, SearchParams
from retrieval.serving.errors import (
    BadIndexReferenceError,
    ItemNotFoundError,
    NotAnImageError,
    PayloadTooLargeError,
    ShardTimeoutError,
    ShardUnavailableError,
    SwapFailedError,
    SwapInProgressError,
    UnauthorizedError,
    VersionNotLoadedError,
    VersionUnavailableError,
)
from retrieval.serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from retrieval.serving.service import SearchService
from retrieval.serving.swap import SwapAdmin

logger = logging.getLogger(__name__)

# Most specific first: the first matching class decides the status and the type.
_ERROR_STATUS: list[tuple[type[RetrievalError], int, str]] = [
    (ItemNotFoundError, 404, "not_found"),
    (BadIndexReferenceError, 422, "bad_index_reference"),
    (SwapInProgressError, 409, "swap_in_progress"),
    (SwapFailedError, 409, "swap_failed"),
    (PayloadTooLargeError, 413, "payload_too_large"),
    (NotAnImageError, 400, "not_an_image"),
    (BadRequestError, 400, "bad_request"),
    (VersionNotLoadedError, 503, "version_unavailable"),
    (VersionUnavailableError, 503, "version_unavailable"),
    (ShardUnavailableError, 503, "shard_unavailable"),
    (ShardTimeoutError, 504, "shard_timeout"),
    (UnauthorizedError, 401, "unauthorized"),
]
_HTTP_TYPES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
# Room for the multipart boundaries and headers around the file itself.
_MULTIPART_OVERHEAD_BYTES = 64 * 1024
# A 512-dimensional vector of strings would otherwise give a 512-part message.
_MAX_REPORTED_ERRORS = 3
# Python refuses to parse integers of more than 4300 digits (a ValueError, not a 4xx).
_FORM_INTEGER = re.compile(r"^\s*[+-]?\d{1,18}\s*$")

# Routes that need the query token when `ServingSpec.query_token_env` is set.
QUERY_ROUTES = frozenset(
    {
        "/search",
        "/search/vector",
        "/search/vectors",
        "/search/image",
        "/search/id",
        "/search/text",
        "/items/{item_id}",
        "/items/{item_id}/thumbnail",
        "/version",
    }
)
_UPLOAD_ROUTES = frozenset({"/search/image"})
# Faiss takes nprobe and efSearch as C ints.
UNMATCHED_ENDPOINT = "unmatched"

# The page's files, served from the installed package (they are package data of the wheel).
_PAGE_FILES = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# The page loads nothing from elsewhere: it must work offline and inside a private network.
_PAGE_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


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


def _search_params(params: IndexParams | None) -> SearchParams | None:
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


_QUERY_FIELDS = ("vector", "id", "text", "image")


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
        given = [name for name in _QUERY_FIELDS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of {', '.join(_QUERY_FIELDS)}; got {', '.join(given) if given else 'none'}"
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
    shards: list[dict[str, Any]]
    embedder: dict[str, Any]
    error: ErrorBody | None = None


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorReply} for status in statuses}


# --------------------------------------------------------------------------- helpers


def decode_base64_image(data: str, *, max_bytes: int) -> bytes:
    """The image bytes of a base64 ``image`` field, refusing oversize ones before decoding.

    Raises:
        PayloadTooLargeError: the decoded image would be over ``max_bytes``.
        BadRequestError: the field is not valid base64.
    """
    # 4 base64 characters carry 3 bytes; the padding makes this an upper bound.
    if len(data) // 4 * 3 > max_bytes + 3:
        raise PayloadTooLargeError(f"the image is about {len(data) // 4 * 3} bytes, the limit is {max_bytes}")
    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as error:
        raise BadRequestError(f"image is not valid base64: {error}") from None
    if len(decoded) > max_bytes:
        raise PayloadTooLargeError(f"the image is {len(decoded)} bytes, the limit is {max_bytes}")
    return decoded


def error_response(
    status: int, error_type: str, message: str, *, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The one shape of every error reply: ``{"error": {"type", "message"}}``."""
    return JSONResponse(
        status_code=status, content={"error": {"type": error_type, "message": message}}, headers=headers
    )


def describe_validation_error(error: RequestValidationError) -> str:
    """One line naming each offending field, e.g. ``body.vector: Field required``."""
    details = list(error.errors())
    parts = []
    for detail in details[:_MAX_REPORTED_ERRORS]:
        location = detail.get("loc", ())
        if detail.get("type") == "json_invalid":
            reason = (detail.get("ctx") or {}).get("error", detail.get("msg", ""))
            where = f" at character {location[1]}" if len(location) > 1 else ""
            parts.append(f"malformed JSON body{where}: {reason}")
            continue
        dotted = ".".join(str(part) for part in location)
        parts.append(f"{dotted}: {detail.get('msg', 'invalid')}" if dotted else str(detail.get("msg")))
    if len(details) > _MAX_REPORTED_ERRORS:
        parts.append(f"and {len(details) - _MAX_REPORTED_ERRORS} more problems")
    return "; ".join(parts) or "invalid request"


def json_body_limit(spec: ServingSpec) -> int:
    """The largest JSON body accepted: a base64 image of ``max_upload_bytes`` plus 64 KiB."""
    return spec.max_upload_bytes * 4 // 3 + _MULTIPART_OVERHEAD_BYTES


def upload_body_limit(spec: ServingSpec) -> int:
    """The largest multipart body accepted: ``max_upload_bytes`` plus 64 KiB of form overhead."""
    return spec.max_upload_bytes + _MULTIPART_OVERHEAD_BYTES


def text_queries_supported(manifest_modality: str, gallery: dict[str, Any]) -> bool:
    """Whether the served model is cross-modal, so text queries can be embedded.

    Cross-modal indices record their gallery's modality (`build_cross_modal_index`) and may
    index texts; image-only models index images and record neither.
    """
    return manifest_modality == "text" or "modality" in gallery


def _install_error_handlers(api: FastAPI) -> None:
    @api.exception_handler(RequestValidationError)
    async def _validation(_: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(422, "validation_error", describe_validation_error(error))

    @api.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        error_type = _HTTP_TYPES.get(error.status_code, "bad_request" if error.status_code < 500 else "internal_error")
        return error_response(error.status_code, error_type, f"{error.detail} ({request.method} {request.url.path})")

    @api.exception_handler(RetrievalError)
    async def _retrieval(_: Request, error: RetrievalError) -> JSONResponse:
        for error_class, status, error_type in _ERROR_STATUS:
            if isinstance(error, error_class):
                headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
                return error_response(status, error_type, str(error), headers=headers)
        logger.error("unmapped platform error: %s", error)
        return error_response(500, "internal_error", str(error))

    @api.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception) -> JSONResponse:
        logger.exception("internal error while answering a request")
        return error_response(500, "internal_error", f"{type(error).__name__}: {error}")


def _form_integer(raw: object, name: str) -> int | None:
    """An optional integer form field: None when absent or empty.

    Raises:
        RequestValidationError: the field is not an integer (of at most 18 digits).
    """
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str) or not _FORM_INTEGER.match(raw):
        raise RequestValidationError(
            [{"type": "int_parsing", "loc": ("body", name), "msg": "Input should be a valid integer"}]
        )
    return int(raw)


async def _read_upload(request: Request, *, max_bytes: int) -> tuple[bytes, int | None, SearchParams | None]:
    """The ``file``, ``k`` and index settings (``nprobe``, ``ef_search``) of a multipart upload.

    Raises:
        RequestValidationError: no file, or a number field that is not an integer.
        PayloadTooLargeError: the file is over ``max_bytes``.
        BadRequestError: a setting below 1.
    """
    async with request.form(max_files=1, max_fields=8) as form:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise RequestValidationError(
                [{"type": "missing", "loc": ("body", "file"), "msg": "Field required (a multipart file upload)"}]
            )
        data = await upload.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise PayloadTooLargeError(f"the uploaded file is over {max_bytes} bytes, the limit")
        k = _form_integer(form.get("k"), "k")
        settings = {name: _form_integer(form.get(name), name) for name in ("nprobe", "ef_search")}
    given = {name: value for name, value in settings.items() if value is not None}
    return data, k, SearchParams.from_mapping(given) if given else None


def _bearer_refusal(request_headers: dict[str, str], *, expected: str, what: str) -> JSONResponse | None:
    """The 401 reply when the request's bearer token is missing or differs from ``expected``."""
    scheme, _, given = request_headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        message = f"{what} need an 'Authorization: Bearer <token>' header"
    elif not hmac.compare_digest(given.strip().encode(), expected.encode()):
        message = f"the {what.split()[0]} token is not valid"
    else:
        return None
    return error_response(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


def _admin_refusal(request: Request, *, token_env: str, admin: SwapAdmin | None) -> JSONResponse | None:
    """The 401/403 reply for an admin request that may not proceed, or None when it may."""
    expected = os.environ.get(token_env, "")
    if admin is None or not expected:
        return error_response(
            403, "forbidden", f"admin endpoints are disabled: set {token_env} in the ingress replicas' environment"
        )
    return _bearer_refusal(dict(request.headers), expected=expected, what="admin endpoints")


# --------------------------------------------------------------------------- middleware


class RequestGate:
    """ASGI middleware in front of the routes: query token, body-size cap and request metrics.

    It resolves each request's route template first (``/items/{item_id}``; ``"unmatched"``
    for an unknown path), so the token is checked and an oversize body refused before a byte
    of the body is read, and every request, refused or not, is counted by its template and
    status in ``service.metrics``.

    Args:
        app: the application behind the gate.
        service: the search service (its spec and metrics).
        routes: the application's routes (the live list: routes added later count too).
    """

    def __init__(self, app: ASGIApp, *, service: SearchService, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self._service = service
        self._routes = routes
        self._json_limit = json_body_limit(service.spec)
        self._upload_limit = upload_body_limit(service.spec)

    def endpoint(self, scope: Scope) -> str:
        """The route template a request goes to, or ``"unmatched"``."""
        partial = None
        for route in self._routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return str(getattr(route, "path", UNMATCHED_ENDPOINT))
            if match is Match.PARTIAL and partial is None:
                partial = str(getattr(route, "path", UNMATCHED_ENDPOINT))
        return partial or UNMATCHED_ENDPOINT

    @staticmethod
    def _reads_body(scope: Scope, endpoint: str) -> bool:
        # Only POST routes read a body; others leave it unread, so it costs nothing to refuse.
        return scope["method"] == "POST" and endpoint != UNMATCHED_ENDPOINT

    def _refusal(self, scope: Scope, endpoint: str, limit: int) -> JSONResponse | None:
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        token_env = self._service.spec.query_token_env
        if token_env is not None and endpoint in QUERY_ROUTES and scope["method"] != "OPTIONS":
            expected = os.environ.get(token_env, "")
            if not expected:
                return error_response(
                    403,
                    "forbidden",
                    f"query endpoints are disabled: set {token_env} in the ingress replicas' environment",
                )
            refusal = _bearer_refusal(headers, expected=expected, what="query endpoints")
            if refusal is not None:
                return refusal
        declared = headers.get("content-length", "").strip()
        if self._reads_body(scope, endpoint) and declared.isdigit() and int(declared) > limit:
            if endpoint in _UPLOAD_ROUTES:
                message = (
                    f"the upload is {int(declared)} bytes, the limit is {self._service.spec.max_upload_bytes} "
                    f"(plus {_MULTIPART_OVERHEAD_BYTES} bytes of form overhead)"
                )
            else:
                message = f"the request body is {int(declared)} bytes, the limit is {limit}"
            return error_response(413, "payload_too_large", message)
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        endpoint = self.endpoint(scope)
        limit = self._upload_limit if endpoint in _UPLOAD_ROUTES else self._json_limit
        # An exception escaping here becomes a 500 in Starlette's outermost middleware.
        status = 500

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        received = 0
        reads_body = self._reads_body(scope, endpoint)

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request" and reads_body:
                received += len(message.get("body", b""))
                if received > limit:
                    # Raised inside the body read, so it reaches the 413 handler like a route's error.
                    raise StarletteHTTPException(413, f"the request body is over {limit} bytes, the limit")
            return message

        try:
            refusal = self._refusal(scope, endpoint, limit)
            if refusal is not None:
                await refusal(scope, receive, send_counted)
            else:
                await self.app(scope, receive_limited, send_counted)
        finally:
            self._service.metrics.observe_request(
                endpoint=endpoint, status=status, seconds=time.perf_counter() - started
            )


# --------------------------------------------------------------------------- the app


def _page_file(name: str) -> bytes:
    return resources.files("retrieval.serving").joinpath("page", name).read_bytes()


def _not_ready_message(readiness: dict[str, Any]) -> str:
    waiting = [
        str(shard.get("shard", position))
        for position, shard in enumerate(readiness.get("shards", []))
        if isinstance(shard, dict) and not shard.get("ready", False)
    ]
    parts = [f"shards {', '.join(waiting)} not ready"] if waiting else []
    embedder = readiness.get("embedder")
    if isinstance(embedder, dict) and not embedder.get("ready", True):
        parts.append("the embedder is not ready")
    detail = "; ".join(parts) or "see shards and embedder"
    return f"not ready for index {readiness.get('index_version')}: {detail}"


def _openapi_with_security(api: FastAPI, *, query_token: bool) -> Callable[[], dict[str, Any]]:
    """The schema generator: FastAPI's, plus the bearer scheme on the routes that need it."""

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            schema = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
            schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, operations in schema.get("paths", {}).items():
                protected = path.startswith("/admin/") or (query_token and path in QUERY_ROUTES)
                if protected:
                    for operation in operations.values():
                        operation["security"] = [{"bearer": []}]
            api.openapi_schema = schema
        return api.openapi_schema

    return openapi


def build_http_api(service: SearchService, admin: SwapAdmin | None = None) -> FastAPI:
    """The FastAPI app that serves ``service`` (see the module docstring for the routes).

    Args:
        service: the search logic; each request is answered by its active version.
        admin: the swap controller behind ``/admin/*``; None disables those routes (403).

    Returns:
        A FastAPI app; in Serve it is the ingress deployment's ASGI app.
    """
    spec = service.spec
    api = FastAPI(
        title="retrieval search",
        version=__version__,
        description="Image (and cross-modal text) retrieval over a sharded Faiss index.",
    )
    _install_error_handlers(api)
    query_token = spec.query_token_env is not None
    auth = (401, 403) if query_token else ()
    # Statuses every search can answer with besides 200.
    search_errors = _errors(400, 413, 422, 503, 504, *auth)

    def linked(hits: list[dict[str, Any]]) -> None:
        for hit in hits:
            hit["thumbnail_url"] = f"items/{hit['id']}/thumbnail"

    def reply(body: dict[str, Any], *, batch: bool = False) -> JSONResponse:
        if service.manifest.thumbnails:
            for hits in body["results"] if batch else [body["results"]]:
                linked(hits)
        return JSONResponse(body)

    search_reply: dict[int | str, dict[str, Any]] = {200: {"model": SearchReply}}

    @api.post("/search/vector", responses={**search_reply, **search_errors})
    async def search_vector(query: VectorQuery) -> JSONResponse:
        """Search by a raw query vector of the index's dimension."""
        return reply(await service.search_vector(query.vector, query.k, params=_search_params(query.params)))

    @api.post("/search/vectors", responses={200: {"model": BatchSearchReply}, **search_errors})
    async def search_vectors(query: VectorsQuery) -> JSONResponse:
        """Search by a batch of query vectors (at most ``max_query_vectors``), answered in order."""
        answer = await service.search_vectors(query.vectors, query.k, params=_search_params(query.params))
        return reply(answer, batch=True)

    upload_body = {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "file": {"type": "string", "format": "binary", "description": "the query image"},
                            "k": {"type": "integer", "description": "results wanted (1..max_k)"},
                            "nprobe": {"type": "integer", "minimum": 1, "maximum": MAX_SETTING},
                            "ef_search": {"type": "integer", "minimum": 1, "maximum": MAX_SETTING},
                        },
                    }
                }
            },
        }
    }

    @api.post("/search/image", responses={**search_reply, **search_errors}, openapi_extra=upload_body)
    async def search_image(request: Request) -> JSONResponse:
        """Search by an uploaded image (multipart ``file``), embedded by the index's model."""
        data, k, params = await _read_upload(request, max_bytes=spec.max_upload_bytes)
        return reply(await service.search_image(data, k, params=params))

    @api.post("/search/id", responses={**search_reply, **search_errors, **_errors(404)})
    async def search_id(query: IdQuery) -> JSONResponse:
        """The neighbours of a gallery item, excluding the item itself."""
        return reply(await service.search_id(query.id, query.k, params=_search_params(query.params)))

    @api.post("/search/text", responses={**search_reply, **search_errors})
    async def search_text(query: TextQuery) -> JSONResponse:
        """Search by a sentence (cross-modal models)."""
        return reply(await service.search_text(query.text, query.k, params=_search_params(query.params)))

    @api.post("/search", responses={**search_reply, **search_errors, **_errors(404)})
    async def search(query: SearchQuery) -> JSONResponse:
        """Search by exactly one of a vector, a gallery id, a text or a base64 image."""
        params = _search_params(query.params)
        if query.text is not None:
            return reply(await service.search_text(query.text, query.k, params=params))
        if query.vector is not None:
            return reply(await service.search_vector(query.vector, query.k, params=params))
        if query.id is not None:
            return reply(await service.search_id(query.id, query.k, params=params))
        image = decode_base64_image(query.image or "", max_bytes=spec.max_upload_bytes)
        return reply(await service.search_image(image, query.k, params=params))

    @api.get("/items/{item_id}", responses={200: {"model": ItemReply}, **_errors(404, 422, 503, 504, *auth)})
    async def item(item_id: int) -> JSONResponse:
        """The stored metadata of one gallery item."""
        return JSONResponse(await service.item(item_id))

    @api.get(
        "/items/{item_id}/thumbnail",
        response_class=Response,
        responses={
            200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
            **_errors(404, 422, 503, 504, *auth),
        },
    )
    async def thumbnail(item_id: int) -> Response:
        """The item's thumbnail (PNG); 404 for an index built without thumbnails."""
        return Response(await service.thumbnail(item_id), media_type="image/png")

    @api.get("/healthz", responses={200: {"model": HealthReply}})
    async def healthz() -> JSONResponse:
        """Liveness: the ingress answers."""
        return JSONResponse({"status": "ok"})

    @api.get("/readyz", responses={200: {"model": ReadinessReply}, 503: {"model": ReadinessReply}})
    async def readyz() -> JSONResponse:
        """Readiness: every shard and the embedder hold the active index version."""
        readiness = await service.readiness()
        if readiness.get("ready"):
            return JSONResponse(readiness)
        body = {**readiness, "error": {"type": "not_ready", "message": _not_ready_message(readiness)}}
        return JSONResponse(body, status_code=503)

    @api.get("/version", responses={200: {"model": VersionReply}, **_errors(*auth)})
    async def version() -> JSONResponse:
        """The model, the index version and the manifest answering now."""
        info = service.version_info()
        manifest = info["manifest"]
        info["text_queries"] = text_queries_supported(manifest.get("modality", "image"), manifest.get("gallery", {}))
        return JSONResponse(info)

    @api.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {METRICS_CONTENT_TYPE: {"schema": {"type": "string"}}}}},
    )
    async def metrics() -> Response:
        """Prometheus metrics: requests per endpoint, shard calls, batch sizes, the active version."""
        return Response(service.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    page = _page_file("index.html")
    page_files = {name: (_page_file(name), media_type) for name, media_type in _PAGE_FILES.items()}

    @api.get("/", include_in_schema=False)
    async def search_page(request: Request) -> Response:
        # The page's links are relative; they resolve under the route prefix only from "<prefix>/".
        if not request.url.path.endswith("/"):
            return Response(status_code=307, headers={"Location": f"{request.url.path}/"})
        return HTMLResponse(page, headers={"Content-Security-Policy": _PAGE_POLICY})

    @api.get("/ui/{name}", include_in_schema=False)
    async def page_file(name: str) -> Response:
        if name not in page_files:
            return error_response(404, "not_found", f"no page file {name!r}; there are {sorted(page_files)}")
        content, media_type = page_files[name]
        return Response(content, media_type=media_type)

    # The token is checked before the body is parsed, so an anonymous caller learns nothing
    # about the request schema; hence a raw Request, validated by hand.
    @api.post(
        "/admin/swap",
        response_model=None,
        responses=_errors(401, 403, 409, 413, 422),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": SwapRequest.model_json_schema()}},
            }
        },
    )
    async def admin_swap(request: Request) -> dict[str, Any] | JSONResponse:
        """Roll every replica to another index version (bearer token: ``admin_token_env``)."""
        refusal = _admin_refusal(request, token_env=spec.admin_token_env, admin=admin)
        if refusal is not None or admin is None:
            return refusal or error_response(403, "forbidden", "admin endpoints are disabled")
        try:
            body = SwapRequest.model_validate_json(await request.body())
        except ValidationError as error:
            raise RequestValidationError(
                [{**detail, "loc": ("body", *detail.get("loc", ()))} for detail in error.errors()]
            ) from None
        return await admin.swap(body.index)

    @api.get("/admin/status", response_model=None, responses=_errors(401, 403))
    async def admin_status(request: Request) -> dict[str, Any] | JSONResponse:
        """The swap state: active, prepared and retiring versions, every replica's state."""
        refusal = _admin_refusal(request, token_env=spec.admin_token_env, admin=admin)
        if refusal is not None or admin is None:
            return refusal or error_response(403, "forbidden", "admin endpoints are disabled")
        return await admin.status()

    api.openapi = _openapi_with_security(api, query_token=query_token)  # type: ignore[method-assign]
    api.add_middleware(RequestGate, service=service, routes=api.router.routes)
    if spec.cors_origins:
        # Outside the gate: a browser's preflight carries no token and must still be answered.
        api.add_middleware(
            CORSMiddleware,
            allow_origins=list(spec.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    return api

"""The HTTP API of the search service (FastAPI), over a `SearchService`.

Endpoints::

    POST /search          JSON {"text" | "vector" | "id" | "image": ..., "k": int?}, exactly one
                          query field; "image" is the image file base64-encoded
    POST /search/vector   JSON {"vector": [float, ...], "k": int?}
    POST /search/image    multipart form: file (image bytes), k (optional form field)
    POST /search/id       JSON {"id": int, "k": int?}   neighbours, excluding the item
    POST /search/text     JSON {"text": str, "k": int?}  cross-modal models: search by a sentence
    GET  /items/{id}      the stored metadata of one gallery item
    GET  /healthz         {"status": "ok"}
    GET  /version         {"model": {...}, "index_version": str, "manifest": {...}}
    POST /admin/swap      JSON {"index": "<version name under the served root> | <manifest path or s3:// URI>"}
                          -> {"from", "to", "model", "duration_s", "replicas"}   (rolling swap)
    GET  /admin/status    {"active", "model", "prepared", "retiring", "epoch", "replicas": {...}}

The admin routes need ``Authorization: Bearer <token>``, the token being the value of the
environment variable ``ServingSpec.admin_token_env`` (default ``RETRIEVAL_ADMIN_TOKEN``) on the
ingress replica, read per request; when that variable is unset or empty they are disabled.

Every search reply is ``{"model": {"name", "version", "uri"}, "index_version", "modality", "k",
"results": [{"id", "score", <item fields, e.g. label, source>}, ...]}``, best first (highest
``score``); ``modality`` ("image" or "text") says what the indexed items are. A binary (hashing)
index also gives each result its Hamming ``distance``, with ``score = 1 - 2 * distance / bits``
(the cosine of the two ±1 codes, in [-1, 1]); its vector queries hold one real value per bit,
of which only the sign counts.

Every error reply is ``{"error": {"type": str, "message": str}}`` (ARCHITECTURE invariant 4):

    422 validation_error    the request does not fit the schema: malformed JSON, a missing
                            or unknown field, a value of the wrong type, not exactly one
                            query field in POST /search (FastAPI's RequestValidationError,
                            reshaped)
    400 bad_request         well-formed but invalid: wrong vector length, non-finite values,
                            k outside 1..max_k, an empty or blank text, a text query to a model
                            that embeds images only, an "image" that is not base64
    400 not_an_image        the upload is not a readable image
    413 payload_too_large   the upload is bigger than max_upload_bytes, or a text is longer
                            than MAX_TEXT_CHARS (10,000) characters
    404 not_found           unknown gallery id, or unknown route
    405 method_not_allowed  a known route with the wrong method
    503 version_unavailable no replica holds the pinned index version (retry later)
    401 unauthorized        admin route without a bearer token, or with a wrong one
    403 forbidden           admin routes are disabled (no token configured on the server)
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
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from retrieval import __version__
from retrieval.errors import BadRequestError, RetrievalError
from retrieval.serving.errors import (
    BadIndexReferenceError,
    ItemNotFoundError,
    NotAnImageError,
    PayloadTooLargeError,
    SwapFailedError,
    SwapInProgressError,
    VersionNotLoadedError,
    VersionUnavailableError,
)
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
]
_HTTP_TYPES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
# Room for the multipart boundaries and headers around the file itself.
_MULTIPART_OVERHEAD_BYTES = 64 * 1024
# A 512-dimensional vector of strings would otherwise give a 512-part message.
_MAX_REPORTED_ERRORS = 3


class VectorQuery(BaseModel):
    """Body of ``POST /search/vector``."""

    model_config = ConfigDict(extra="forbid")

    vector: list[float]
    k: int | None = None


class TextQuery(BaseModel):
    """Body of ``POST /search/text``."""

    model_config = ConfigDict(extra="forbid")

    text: str
    k: int | None = None


_QUERY_FIELDS = ("vector", "id", "text", "image")


class SearchQuery(BaseModel):
    """Body of ``POST /search``: exactly one of ``vector``, ``id``, ``text``, ``image`` (base64)."""

    model_config = ConfigDict(extra="forbid")

    vector: list[float] | None = None
    id: int | None = None
    text: str | None = None
    image: str | None = None
    k: int | None = None

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


def error_response(status: int, error_type: str, message: str) -> JSONResponse:
    """The one shape of every error reply: ``{"error": {"type", "message"}}``."""
    return JSONResponse(status_code=status, content={"error": {"type": error_type, "message": message}})


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
                return error_response(status, error_type, str(error))
        logger.error("unmapped platform error: %s", error)
        return error_response(500, "internal_error", str(error))

    @api.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception) -> JSONResponse:
        logger.exception("internal error while answering a request")
        return error_response(500, "internal_error", f"{type(error).__name__}: {error}")


async def _read_upload(request: Request, *, max_bytes: int) -> tuple[bytes, int | None]:
    """The ``file`` and ``k`` fields of a multipart upload, refusing oversize uploads early."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes + _MULTIPART_OVERHEAD_BYTES:
        raise PayloadTooLargeError(f"the upload is {int(declared)} bytes, the limit is {max_bytes}")
    async with request.form(max_files=1, max_fields=8) as form:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise RequestValidationError(
                [{"type": "missing", "loc": ("body", "file"), "msg": "Field required (a multipart file upload)"}]
            )
        data = await upload.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise PayloadTooLargeError(f"the uploaded file is over {max_bytes} bytes, the limit")
        raw_k = form.get("k")
    if raw_k is None or raw_k == "":
        return data, None
    if not isinstance(raw_k, str) or not raw_k.strip().lstrip("-").isdigit():
        raise RequestValidationError(
            [{"type": "int_parsing", "loc": ("body", "k"), "msg": "Input should be a valid integer"}]
        )
    return data, int(raw_k)


def _admin_refusal(request: Request, *, token_env: str, admin: SwapAdmin | None) -> JSONResponse | None:
    """The 401/403 reply for an admin request that may not proceed, or None when it may."""
    expected = os.environ.get(token_env, "")
    if admin is None or not expected:
        return error_response(
            403, "forbidden", f"admin endpoints are disabled: set {token_env} in the ingress replicas' environment"
        )
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        reply = error_response(401, "unauthorized", "admin endpoints need an 'Authorization: Bearer <token>' header")
    elif not hmac.compare_digest(given.strip().encode(), expected.encode()):
        reply = error_response(401, "unauthorized", "the admin token is not valid")
    else:
        return None
    reply.headers["WWW-Authenticate"] = "Bearer"
    return reply


def build_http_api(service: SearchService, admin: SwapAdmin | None = None) -> FastAPI:
    """The FastAPI app that serves ``service`` (see the module docstring for the routes).

    Args:
        service: the search logic; each request is answered by its active version.
        admin: the swap controller behind ``/admin/*``; None disables those routes (403).

    Returns:
        A FastAPI app; in Serve it is the ingress deployment's ASGI app.
    """
    api = FastAPI(title="retrieval search", version=__version__)
    _install_error_handlers(api)

    @api.post("/search/vector")
    async def search_vector(query: VectorQuery) -> dict[str, Any]:
        return await service.search_vector(query.vector, query.k)

    @api.post("/search/image")
    async def search_image(request: Request) -> dict[str, Any]:
        data, k = await _read_upload(request, max_bytes=service.spec.max_upload_bytes)
        return await service.search_image(data, k)

    @api.post("/search/id")
    async def search_id(query: IdQuery) -> dict[str, Any]:
        return await service.search_id(query.id, query.k)

    @api.post("/search/text")
    async def search_text(query: TextQuery) -> dict[str, Any]:
        return await service.search_text(query.text, query.k)

    @api.post("/search")
    async def search(query: SearchQuery) -> dict[str, Any]:
        if query.text is not None:
            return await service.search_text(query.text, query.k)
        if query.vector is not None:
            return await service.search_vector(query.vector, query.k)
        if query.id is not None:
            return await service.search_id(query.id, query.k)
        image = decode_base64_image(query.image or "", max_bytes=service.spec.max_upload_bytes)
        return await service.search_image(image, query.k)

    @api.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, Any]:
        return await service.item(item_id)

    @api.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/version")
    async def version() -> dict[str, Any]:
        return service.version_info()

    # The token is checked before the body is parsed, so an anonymous caller learns nothing
    # about the request schema; hence a raw Request, validated by hand.
    @api.post("/admin/swap", response_model=None)
    async def admin_swap(request: Request) -> dict[str, Any] | JSONResponse:
        refusal = _admin_refusal(request, token_env=service.spec.admin_token_env, admin=admin)
        if refusal is not None or admin is None:
            return refusal or error_response(403, "forbidden", "admin endpoints are disabled")
        try:
            body = SwapRequest.model_validate_json(await request.body())
        except ValidationError as error:
            raise RequestValidationError(
                [{**detail, "loc": ("body", *detail.get("loc", ()))} for detail in error.errors()]
            ) from None
        return await admin.swap(body.index)

    @api.get("/admin/status", response_model=None)
    async def admin_status(request: Request) -> dict[str, Any] | JSONResponse:
        refusal = _admin_refusal(request, token_env=service.spec.admin_token_env, admin=admin)
        if refusal is not None or admin is None:
            return refusal or error_response(403, "forbidden", "admin endpoints are disabled")
        return await admin.status()

    return api

"""How replies are written: JSON (orjson), the one error shape, and the errors each exception becomes.

Every error reply is ``{"error": {"type": str, "message": str}}`` (ARCHITECTURE invariant 4).
A platform error names the problem for the caller; anything else (a bug, or a Ray error
carrying a remote traceback, internal addresses and paths) is a 500 that says only
``internal_error`` and an error id, while the server's log holds the detail under that id.
"""

from __future__ import annotations

import base64
import binascii
import logging
import uuid
from collections.abc import Mapping
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from retrieval.errors import BadRequestError, RetrievalError
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

logger = logging.getLogger(__name__)

# Most specific first: the first matching class decides the status and the type.
ERROR_STATUS: list[tuple[type[RetrievalError], int, str]] = [
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
_HTTP_TYPES = {404: "not_found", 405: "method_not_allowed", 408: "request_timeout", 413: "payload_too_large"}
# A 512-dimensional vector of strings would otherwise give a 512-part message.
_MAX_REPORTED_ERRORS = 3
_ORJSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


class JSONBody(Response):
    """A JSON response encoded with orjson (numpy values included): several times faster than ``json``."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=_ORJSON_OPTIONS)


def error_response(status: int, error_type: str, message: str, *, headers: Mapping[str, str] | None = None) -> JSONBody:
    """The one shape of every error reply: ``{"error": {"type", "message"}}``."""
    return JSONBody(
        status_code=status,
        content={"error": {"type": error_type, "message": message}},
        headers=dict(headers) if headers else None,
    )


def internal_error(error: BaseException, *, what: str) -> JSONBody:
    """A 500 naming only an error id; the detail (type, message, traceback) goes to the log under that id."""
    error_id = uuid.uuid4().hex[:12]
    logger.error("internal error %s while %s: %s: %s", error_id, what, type(error).__name__, error, exc_info=error)
    return error_response(
        500, "internal_error", f"internal error {error_id}; the server's log has the details under this id"
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


def install_error_handlers(api: FastAPI) -> None:
    """Map every exception a route can raise to the one error shape."""

    @api.exception_handler(RequestValidationError)
    async def _validation(_: Request, error: RequestValidationError) -> JSONBody:
        return error_response(422, "validation_error", describe_validation_error(error))

    @api.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONBody:
        error_type = _HTTP_TYPES.get(error.status_code, "bad_request" if error.status_code < 500 else "internal_error")
        return error_response(error.status_code, error_type, f"{error.detail} ({request.method} {request.url.path})")

    @api.exception_handler(RetrievalError)
    async def _retrieval(request: Request, error: RetrievalError) -> JSONBody:
        for error_class, status, error_type in ERROR_STATUS:
            if isinstance(error, error_class):
                headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
                return error_response(status, error_type, str(error), headers=headers)
        return internal_error(error, what=f"answering {request.method} {request.url.path}")

    @api.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONBody:
        return internal_error(error, what=f"answering {request.method} {request.url.path}")


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


def text_queries_supported(manifest_modality: str, gallery: Mapping[str, Any]) -> bool:
    """Whether the served model is cross-modal, so text queries can be embedded.

    Cross-modal indices record their gallery's modality (`cross_modal_gallery`) and may
    index texts; image-only models index images and record neither.
    """
    return manifest_modality == "text" or "modality" in gallery

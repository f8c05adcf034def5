"""The ASGI middleware in front of the routes: access, body size and request metrics, before the body is read.

It finds each request's route first (``/items/{item_id}``; ``"unmatched"`` for an unknown path),
so the route's access (`retrieval.serving.http.auth`) is checked and an oversize body refused
from its ``Content-Length`` before a byte of the body is read, and every request, refused or
not, is counted by its route template and status. A body without a length is cut as soon as
it passes the limit, and a body that trickles in is cut (408) once ``body_read_timeout_s`` has
passed since its first read: a slow client cannot hold an ingress slot for long.

Each route has its own body limit, sized from what it may legitimately carry (`BodyLimits`):
a vector query holds one vector of the index's dimension, a batch at most
``max_query_vectors`` of them, an upload at most ``max_upload_bytes``. So a JSON route cannot be
made to parse megabytes before its own limits are checked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from retrieval.config import ServingSpec
from retrieval.serving.http.auth import AUTHORIZED_SCOPE_KEY, Authorizer, route_access
from retrieval.serving.http.responses import JSONBody, error_response
from retrieval.serving.metrics import ServingMetrics

UNMATCHED_ENDPOINT = "unmatched"
# Room for the multipart boundaries and headers around an uploaded file.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
# Room for a small JSON body's keys, k, params and whitespace.
JSON_OVERHEAD_BYTES = 4 * 1024
# The longest a JSON float can be written ("-1.2345678901234567e-308") plus a separator and a space.
_JSON_FLOAT_BYTES = 28
# A character of a JSON string can take 12 bytes ("\ud83d\ude00" for one emoji).
_JSON_CHAR_BYTES = 12
# The text limit of the service (retrieval.serving.service.MAX_TEXT_CHARS), duplicated to keep this import-light.
_MAX_TEXT_CHARS = 10_000
UPLOAD_ROUTES = frozenset({"/search/image"})


def json_body_limit(spec: ServingSpec) -> int:
    """The largest JSON body any route accepts: ``POST /search`` with a base64 image of ``max_upload_bytes``."""
    return spec.max_upload_bytes * 4 // 3 + MULTIPART_OVERHEAD_BYTES


def upload_body_limit(spec: ServingSpec) -> int:
    """The largest multipart body accepted: ``max_upload_bytes`` plus 64 KiB of form overhead."""
    return spec.max_upload_bytes + MULTIPART_OVERHEAD_BYTES


@dataclass(frozen=True)
class BodyLimits:
    """The body limit of each route, from the spec and the index's dimension (which a swap may change)."""

    spec: ServingSpec

    def vector_bytes(self, dim: int) -> int:
        return dim * _JSON_FLOAT_BYTES + 16

    def of(self, endpoint: str, dim: int) -> int:
        """The limit of ``endpoint`` (a route template) for an index of dimension ``dim``."""
        if endpoint in UPLOAD_ROUTES:
            return upload_body_limit(self.spec)
        if endpoint == "/search":
            # Any query field, an image in base64 being the largest.
            return json_body_limit(self.spec)
        if endpoint == "/search/vector":
            return self.vector_bytes(dim) + JSON_OVERHEAD_BYTES
        if endpoint == "/search/vectors":
            return self.spec.max_query_vectors * self.vector_bytes(dim) + JSON_OVERHEAD_BYTES
        if endpoint == "/search/text":
            return _MAX_TEXT_CHARS * _JSON_CHAR_BYTES + JSON_OVERHEAD_BYTES
        return JSON_OVERHEAD_BYTES * 16


class RequestGate:
    """ASGI middleware: route lookup, access, per-route body limits and request metrics.

    Args:
        app: the application behind the gate.
        spec: the serving spec (token settings, limits).
        metrics: where requests are counted.
        dim: the active index's dimension, read per request (a swap may change it).
        authorizer: who may call which route.
        routes: the application's routes (the live list: routes added later count too).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        spec: ServingSpec,
        metrics: ServingMetrics,
        dim: Callable[[], int],
        authorizer: Authorizer,
        routes: Sequence[BaseRoute],
    ) -> None:
        self.app = app
        self._spec = spec
        self._metrics = metrics
        self._dim = dim
        self._authorizer = authorizer
        self._routes = routes
        self._limits = BodyLimits(spec)
        # (method, path) -> route, for paths that matched a route without path parameters.
        self._static: dict[tuple[str, str], BaseRoute] = {}

    def route(self, scope: Scope) -> BaseRoute | None:
        """The route a request goes to (a full match, else a partial one: a known path, wrong method)."""
        key = (scope["method"], scope["path"])
        found = self._static.get(key)
        if found is not None:
            return found
        partial = None
        for route in self._routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                if getattr(route, "path", None) == scope["path"] and len(self._static) < 1024:
                    self._static[key] = route
                return route
            if match is Match.PARTIAL and partial is None:
                partial = route
        return partial

    def _refusal(self, scope: Scope, route: BaseRoute, endpoint: str, limit: int) -> JSONBody | None:
        if scope["method"] != "OPTIONS":
            headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
            refusal = self._authorizer.refusal(route_access(route), headers)
            if refusal is not None:
                return refusal
            scope[AUTHORIZED_SCOPE_KEY] = True
            declared = headers.get("content-length", "").strip()
        else:
            declared = ""
        if scope["method"] == "POST" and declared.isdigit() and int(declared) > limit:
            if endpoint in UPLOAD_ROUTES:
                message = (
                    f"the upload is {int(declared)} bytes, the limit is {self._spec.max_upload_bytes} "
                    f"(plus {MULTIPART_OVERHEAD_BYTES} bytes of form overhead)"
                )
            else:
                message = f"the request body is {int(declared)} bytes, the limit for {endpoint} is {limit}"
            return error_response(413, "payload_too_large", message)
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        route = self.route(scope)
        endpoint = str(getattr(route, "path", UNMATCHED_ENDPOINT)) if route is not None else UNMATCHED_ENDPOINT
        limit = self._limits.of(endpoint, self._dim())
        # An exception escaping here becomes a 500 in Starlette's outermost middleware.
        status = 500

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        received = 0
        reads_body = scope["method"] == "POST" and route is not None
        body_deadline: float | None = None
        body_timeout = self._spec.body_read_timeout_s

        async def receive_limited() -> Message:
            nonlocal received, body_deadline
            if not reads_body:
                return await receive()
            now = time.monotonic()
            if body_deadline is None:
                body_deadline = now + body_timeout
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, body_deadline - now))
            except TimeoutError:
                raise StarletteHTTPException(
                    408, f"the request body did not arrive within {body_timeout:g} s (body_read_timeout_s)"
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Raised inside the body read, so it reaches the 413 handler like a route's error.
                    raise StarletteHTTPException(
                        413, f"the request body is over {limit} bytes, the limit for {endpoint}"
                    )
            return message

        try:
            refusal = self._refusal(scope, route, endpoint, limit) if route is not None else None
            if refusal is not None:
                await refusal(scope, receive, send_counted)
            else:
                await self.app(scope, receive_limited, send_counted)
        finally:
            self._metrics.observe_request(endpoint=endpoint, status=status, seconds=time.perf_counter() - started)


def describe_limits(spec: ServingSpec, dim: int, routes: Sequence[Any]) -> dict[str, int]:
    """Every POST route's body limit (for documentation and tests)."""
    limits = BodyLimits(spec)
    return {
        route.path: limits.of(route.path, dim) for route in routes if "POST" in (getattr(route, "methods", None) or ())
    }

"""The routes, one router per access level (`retrieval.serving.http.auth`).

``search_router`` (query token): the searches, the items and ``/version``;
``operations_router`` (open): probes, metrics, the OpenAPI document;
``page_router`` (open): the search page;
``admin_router`` (admin token): the rolling swap.

Each factory takes what its routes need and returns the router; `build_http_api` wires them.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.responses import HTMLResponse, Response

from retrieval.index.search_params import MAX_SETTING, SearchParams
from retrieval.serving.errors import PayloadTooLargeError
from retrieval.serving.http import schemas
from retrieval.serving.http.auth import Access, requires
from retrieval.serving.http.responses import JSONBody, decode_base64_image, error_response, text_queries_supported
from retrieval.serving.http.schemas import (
    HealthReply,
    IdQuery,
    ReadinessReply,
    SearchQuery,
    SwapRequest,
    TextQuery,
    VectorQuery,
    VectorsQuery,
    VersionReply,
    error_responses,
    search_params,
)
from retrieval.serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from retrieval.serving.metrics import RAY_EXPORT_PREFIX
from retrieval.serving.replies import SearchReply
from retrieval.serving.service import SearchService
from retrieval.serving.swap import SwapAdmin

# Python refuses to parse integers of more than 4300 digits (a ValueError, not a 4xx).
# What GET /metrics answers (404) where the app runs under Ray Serve.
METRICS_ELSEWHERE = (
    "this application runs under Ray Serve: its metrics are exported by the Ray metrics agent of every "
    f"node (the port of `ray start --metrics-export-port`, 8080 on KubeRay pods) as {RAY_EXPORT_PREFIX}retrieval_*, "
    "tagged with application, deployment and replica; scrape every node (k8s/components/monitoring has a PodMonitor)"
)
_FORM_INTEGER = re.compile(r"^\s*[+-]?\d{1,18}\s*$")
# The page's files, served from the installed package (they are package data of the wheel).
_PAGE_FILES = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# The page loads nothing from elsewhere: it must work offline and inside a private network.
PAGE_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

UPLOAD_BODY = {
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


async def read_upload(request: Request, *, max_bytes: int) -> tuple[bytes, int | None, SearchParams | None]:
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


def search_router(service: SearchService, *, auth_statuses: tuple[int, ...]) -> APIRouter:
    """The query routes: every search, the items, ``/version`` (query token when one is configured)."""
    spec = service.spec
    router = APIRouter(dependencies=[requires(Access.QUERY)], tags=["search"])
    search_errors = error_responses(400, 413, 422, 503, 504, *auth_statuses)
    one_reply: dict[int | str, dict[str, Any]] = {200: {"model": schemas.SearchReply}}

    def reply(answer: SearchReply) -> JSONBody:
        body = answer.to_json()
        if service.manifest.thumbnails:
            for hits in answer.hit_lists():
                for hit in hits:
                    hit["thumbnail_url"] = f"items/{hit['id']}/thumbnail"
        return JSONBody(body)

    @router.post("/search/vector", responses={**one_reply, **search_errors})
    async def search_vector(query: VectorQuery) -> JSONBody:
        """Search by a raw query vector of the index's dimension."""
        return reply(await service.search_vector(query.vector, query.k, params=search_params(query.params)))

    @router.post("/search/vectors", responses={200: {"model": schemas.BatchSearchReply}, **search_errors})
    async def search_vectors(query: VectorsQuery) -> JSONBody:
        """Search by a batch of query vectors (at most ``max_query_vectors``), answered in order."""
        return reply(await service.search_vectors(query.vectors, query.k, params=search_params(query.params)))

    @router.post("/search/image", responses={**one_reply, **search_errors}, openapi_extra=UPLOAD_BODY)
    async def search_image(request: Request) -> JSONBody:
        """Search by an uploaded image (multipart ``file``), embedded by the index's model."""
        data, k, params = await read_upload(request, max_bytes=spec.max_upload_bytes)
        return reply(await service.search_image(data, k, params=params))

    @router.post("/search/id", responses={**one_reply, **search_errors, **error_responses(404)})
    async def search_id(query: IdQuery) -> JSONBody:
        """The neighbours of a gallery item, excluding the item itself."""
        return reply(await service.search_id(query.id, query.k, params=search_params(query.params)))

    @router.post("/search/text", responses={**one_reply, **search_errors})
    async def search_text(query: TextQuery) -> JSONBody:
        """Search by a sentence (cross-modal models)."""
        return reply(await service.search_text(query.text, query.k, params=search_params(query.params)))

    @router.post("/search", responses={**one_reply, **search_errors, **error_responses(404)})
    async def search(query: SearchQuery) -> JSONBody:
        """Search by exactly one of a vector, a gallery id, a text or a base64 image."""
        params = search_params(query.params)
        if query.text is not None:
            return reply(await service.search_text(query.text, query.k, params=params))
        if query.vector is not None:
            return reply(await service.search_vector(query.vector, query.k, params=params))
        if query.id is not None:
            return reply(await service.search_id(query.id, query.k, params=params))
        image = decode_base64_image(query.image or "", max_bytes=spec.max_upload_bytes)
        return reply(await service.search_image(image, query.k, params=params))

    lookup_errors = error_responses(404, 422, 503, 504, *auth_statuses)

    @router.get("/items/{item_id}", responses={200: {"model": schemas.ItemReply}, **lookup_errors})
    async def item(item_id: int) -> JSONBody:
        """The stored metadata of one gallery item."""
        return JSONBody((await service.item(item_id)).to_json())

    @router.get(
        "/items/{item_id}/thumbnail",
        response_class=Response,
        responses={
            200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
            **lookup_errors,
        },
    )
    async def thumbnail(item_id: int) -> Response:
        """The item's thumbnail (PNG); 404 for an index built without thumbnails."""
        return Response(await service.thumbnail(item_id), media_type="image/png")

    @router.get("/version", responses={200: {"model": VersionReply}, **error_responses(*auth_statuses)})
    async def version() -> JSONBody:
        """The model, the index version and the manifest answering now."""
        info = service.version_info()
        manifest = info["manifest"]
        info["text_queries"] = text_queries_supported(manifest.get("modality", "image"), manifest.get("gallery", {}))
        return JSONBody(info)

    return router


def operations_router(service: SearchService, api: FastAPI) -> APIRouter:
    """The open routes for probes, scrapers and clients: liveness, readiness, metrics, the OpenAPI document."""
    router = APIRouter(dependencies=[requires(Access.OPEN)], tags=["operations"])

    @router.get("/healthz", responses={200: {"model": HealthReply}})
    async def healthz() -> JSONBody:
        """Liveness: the ingress answers."""
        return JSONBody({"status": "ok"})

    @router.get("/readyz", responses={200: {"model": ReadinessReply}, 503: {"model": ReadinessReply}})
    async def readyz() -> JSONBody:
        """Readiness: every shard and the embedder hold the active index version."""
        readiness = await service.readiness()
        body = readiness.to_json()
        if readiness.ready:
            return JSONBody(body)
        body["error"] = {"type": "not_ready", "message": readiness.not_ready_message()}
        return JSONBody(body, status_code=503)

    @router.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {METRICS_CONTENT_TYPE: {"schema": {"type": "string"}}}}},
    )
    async def metrics() -> Response:
        """Prometheus metrics: requests per endpoint, shard calls, batch sizes, swaps, the active version.

        Only where the app runs without Ray. Under Ray Serve the metrics go through
        ``ray.serve.metrics`` to every node's metrics agent, which holds every replica's series;
        one replica's registry, reached through the proxy at random, would show a random part.
        """
        text = service.metrics.exposition()
        if text is None:
            return error_response(404, "not_found", METRICS_ELSEWHERE)
        return Response(text, media_type=METRICS_CONTENT_TYPE)

    @router.get("/openapi.json", include_in_schema=False)
    async def openapi() -> JSONBody:
        return JSONBody(api.openapi())

    return router


def _page_file(name: str) -> bytes:
    return resources.files("retrieval.serving").joinpath("page", name).read_bytes()


def page_router() -> APIRouter:
    """The search page (open: it asks the user for the query token when the API needs one)."""
    router = APIRouter(dependencies=[requires(Access.OPEN)], tags=["page"], include_in_schema=False)
    page = _page_file("index.html")
    page_files = {name: (_page_file(name), media_type) for name, media_type in _PAGE_FILES.items()}

    @router.get("/")
    async def search_page(request: Request) -> Response:
        # The page's links are relative; they resolve under the route prefix only from "<prefix>/".
        if not request.url.path.endswith("/"):
            return Response(status_code=307, headers={"Location": f"{request.url.path}/"})
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_POLICY})

    @router.get("/ui/{name}")
    async def page_file(name: str) -> Response:
        if name not in page_files:
            return error_response(404, "not_found", f"no page file {name!r}; there are {sorted(page_files)}")
        content, media_type = page_files[name]
        return Response(content, media_type=media_type)

    return router


def admin_router(admin: SwapAdmin | None) -> APIRouter:
    """The rolling swap (admin token; 403 while none is configured or the app has no swap controller)."""
    router = APIRouter(dependencies=[requires(Access.ADMIN)], tags=["admin"])

    # A raw Request: the body is read only after the token is checked.
    @router.post(
        "/admin/swap",
        response_model=None,
        responses=error_responses(401, 403, 409, 413, 422),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": SwapRequest.model_json_schema()}},
            }
        },
    )
    async def admin_swap(request: Request) -> JSONBody:
        """Roll every replica to another index version (bearer token: ``admin_token_env``)."""
        assert admin is not None  # the access check refuses admin routes of an app without one
        try:
            body = SwapRequest.model_validate_json(await request.body())
        except ValidationError as error:
            raise RequestValidationError(
                [{**detail, "loc": ("body", *detail.get("loc", ()))} for detail in error.errors()]
            ) from None
        return JSONBody(await admin.swap(body.index))

    @router.post("/admin/swap/abort", response_model=None, responses=error_responses(401, 403, 409))
    async def admin_swap_abort() -> JSONBody:
        """Abort the swap in progress: before its flip it is cancelled, after it the old version is active again."""
        assert admin is not None
        return JSONBody(await admin.abort())

    @router.get("/admin/status", response_model=None, responses=error_responses(401, 403))
    async def admin_status() -> JSONBody:
        """The swap state: active, prepared and retiring versions, every replica's state."""
        assert admin is not None
        return JSONBody(await admin.status())

    return router

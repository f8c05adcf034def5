"""`build_http_api`: the FastAPI app of a `SearchService`, wired from its routers, gate and handlers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import BaseRoute

from retrieval import __version__
from retrieval.serving.http.auth import Access, Authorizer, authorize, install_refusal_handler, route_access
from retrieval.serving.http.gate import RequestGate
from retrieval.serving.http.responses import install_error_handlers
from retrieval.serving.http.routes import admin_router, operations_router, page_router, search_router
from retrieval.serving.service import SearchService
from retrieval.serving.swap import SwapAdmin


def _openapi_with_security(
    api: FastAPI, authorizer: Authorizer, routes: Sequence[BaseRoute]
) -> Callable[[], dict[str, Any]]:
    """The schema generator: FastAPI's, plus the bearer scheme on the routes whose access needs a token."""

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            schema = get_openapi(title=api.title, version=api.version, description=api.description, routes=routes)
            schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for route in routes:
                access = route_access(route)
                protected = access is Access.ADMIN or (access is Access.QUERY and authorizer.query_token_required)
                operations = schema.get("paths", {}).get(getattr(route, "path", ""), {})
                if protected:
                    for method in getattr(route, "methods", ()) or ():
                        if method.lower() in operations:
                            operations[method.lower()]["security"] = [{"bearer": []}]
            api.openapi_schema = schema
        return api.openapi_schema

    return openapi


def build_http_api(service: SearchService, admin: SwapAdmin | None = None) -> FastAPI:
    """The FastAPI app that serves ``service`` (see `retrieval.serving.http` for the routes).

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
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        dependencies=[Depends(authorize)],
    )
    authorizer = Authorizer(spec, admin_enabled=admin is not None)
    api.state.authorizer = authorizer
    install_error_handlers(api)
    install_refusal_handler(api)
    auth_statuses = (401, 403) if authorizer.query_token_required else ()
    routers = [
        search_router(service, auth_statuses=auth_statuses),
        operations_router(service, api),
        page_router(),
        admin_router(admin),
    ]
    for router in routers:
        api.include_router(router)
    # The routes as declared, each with its router's access marker (FastAPI keeps included
    # routers nested, so the application's own list does not show them).
    routes = [route for router in routers for route in router.routes]
    api.openapi = _openapi_with_security(api, authorizer, routes)  # type: ignore[method-assign]
    api.add_middleware(
        RequestGate,
        spec=spec,
        metrics=service.metrics,
        dim=lambda: service.manifest.dim,
        authorizer=authorizer,
        routes=routes,
    )
    if spec.cors_origins:
        # Outside the gate: a browser's preflight carries no token and must still be answered.
        api.add_middleware(
            CORSMiddleware,
            allow_origins=list(spec.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    return api

"""Who may call which route: every route is protected by the query token unless it says otherwise.

A route declares its access with the dependency its router carries (`requires`):

- `Access.OPEN`: probes, metrics, the OpenAPI document and the search page (probes and
  scrapers carry no token; the page asks the user for one);
- `Access.ADMIN`: the swap routes, which need the admin token (``admin_token_env``) and are
  disabled (403) while none is configured;
- `Access.QUERY`: everything else, including any route that declares nothing, which needs the
  query token when ``query_token_env`` is set.

The check is `authorize`, a dependency of the whole application, so it runs for every route
whatever router it is on: a new route is protected by default. `RequestGate` makes the same
check for the routes it knows before a byte of the body is read (an anonymous caller learns
nothing about the schema, and pays nothing for a big body), and `authorize` then skips it.

Tokens are compared in constant time. A configured token is stripped of surrounding whitespace
(a secret mounted from a file often ends in a newline) and must be at least
`MIN_TOKEN_CHARS` characters; a shorter one disables the routes it guards (403, and a log line).
"""

from __future__ import annotations

import enum
import hmac
import logging
import os
from collections.abc import Mapping
from typing import Any

from fastapi import Depends, Request
from fastapi.params import Depends as DependsParam

from retrieval.config import ServingSpec
from retrieval.serving.http.responses import JSONBody, error_response

logger = logging.getLogger(__name__)

MIN_TOKEN_CHARS = 16
# Set by the gate once it has let a request through, so the route's dependency does not check twice.
AUTHORIZED_SCOPE_KEY = "retrieval.authorized"


class Access(enum.Enum):
    OPEN = "open"
    QUERY = "query"
    ADMIN = "admin"


def configured_token(env: str) -> tuple[str | None, str | None]:
    """The token an environment variable holds, or why it cannot be used: ``(token, None)`` or ``(None, reason)``."""
    token = os.environ.get(env, "").strip()
    if not token:
        return None, f"set {env} in the ingress replicas' environment"
    if len(token) < MIN_TOKEN_CHARS:
        logger.error("%s holds a token of %d characters; at least %d are required", env, len(token), MIN_TOKEN_CHARS)
        return None, f"the token in {env} is shorter than {MIN_TOKEN_CHARS} characters; set a longer one"
    return token, None


def _bearer(headers: Mapping[str, str]) -> str | None:
    scheme, _, given = headers.get("authorization", "").partition(" ")
    given = given.strip()
    return given if scheme.lower() == "bearer" and given else None


class Authorizer:
    """Decides whether a request may reach a route of some access level.

    Args:
        spec: the serving spec (which environment variables hold the tokens).
        admin_enabled: whether admin routes exist at all (an app without a swap controller).
    """

    def __init__(self, spec: ServingSpec, *, admin_enabled: bool) -> None:
        self._query_env = spec.query_token_env
        self._admin_env = spec.admin_token_env
        self._admin_enabled = admin_enabled

    @property
    def query_token_required(self) -> bool:
        return self._query_env is not None

    def refusal(self, access: Access, headers: Mapping[str, str]) -> JSONBody | None:
        """The 401/403 reply for a request that may not proceed, or None when it may.

        Args:
            access: the access level of the route.
            headers: the request headers, lower-case names.
        """
        if access is Access.OPEN:
            return None
        if access is Access.ADMIN:
            if not self._admin_enabled:
                return error_response(403, "forbidden", "admin endpoints are disabled in this application")
            env, what = self._admin_env, "admin endpoints"
        else:
            if self._query_env is None:
                return None
            env, what = self._query_env, "query endpoints"
        expected, reason = configured_token(env)
        if expected is None:
            return error_response(403, "forbidden", f"{what} are disabled: {reason}")
        given = _bearer(headers)
        if given is None:
            message = f"{what} need an 'Authorization: Bearer <token>' header"
        elif not hmac.compare_digest(given.encode(), expected.encode()):
            message = f"the {what.split()[0]} token is not valid"
        else:
            return None
        return error_response(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


class _AccessMarker:
    """The dependency a router declares its routes' access with (`requires`); `authorize` reads it."""

    def __init__(self, access: Access) -> None:
        self.access = access

    async def __call__(self) -> None:
        return None


class _Refused(Exception):
    """Raised by `authorize`; its handler sends the prepared refusal."""

    def __init__(self, response: JSONBody) -> None:
        super().__init__("refused")
        self.response = response


async def authorize(request: Request) -> None:
    """The application-wide dependency: refuse a request its route's access does not allow.

    Every route runs it, whatever router it is on, so a route that declares nothing gets
    `Access.QUERY`. The gate has usually checked already (before the body was read).
    """
    if request.scope.get(AUTHORIZED_SCOPE_KEY):
        return
    authorizer: Authorizer = request.app.state.authorizer
    access = route_access(request.scope.get("route"))
    refusal = authorizer.refusal(access, {key.lower(): value for key, value in request.headers.items()})
    if refusal is not None:
        raise _Refused(refusal)


def install_refusal_handler(api: Any) -> None:
    @api.exception_handler(_Refused)
    async def _refused(_: Request, error: _Refused) -> JSONBody:
        return error.response


def requires(access: Access) -> DependsParam:
    """Declare a router's access level: ``APIRouter(dependencies=[requires(Access.OPEN)])``."""
    return Depends(_AccessMarker(access))


def route_access(route: Any) -> Access:
    """The access a route declared through `requires`; `Access.QUERY` when it declared none."""
    for dependency in getattr(route, "dependencies", ()):
        marker = getattr(dependency, "dependency", None)
        if isinstance(marker, _AccessMarker):
            return marker.access
    return Access.QUERY

"""Ask a running search application to swap its live index (``POST /admin/swap``).

Used by ``retrieval serve swap`` and by the incremental runner after a task's model version
passes its gate. The swap itself is a rolling swap (`retrieval.serving.swap`): it returns once
every replica serves the new version and the old one is freed, or fails with the reason while
the old version keeps serving.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval.errors import RetrievalError

logger = logging.getLogger(__name__)


class SwapRequestError(RetrievalError):
    """The application refused or failed a swap, or could not be reached.

    Attributes:
        status: the HTTP status (None when no reply came back).
        error_type: the reply's ``error.type`` (e.g. ``swap_failed``, ``unauthorized``).
    """

    def __init__(self, message: str, *, status: int | None = None, error_type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Never follow a redirect: urllib would send the admin token on to wherever it points."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        raise SwapRequestError(
            f"{req.full_url} answered HTTP {code} redirecting to {newurl}; not following it with the admin token "
            "(give the application's own URL)",
            status=code,
        )


_OPENER = urllib.request.build_opener(_RefuseRedirects)


def request_swap(url: str, *, index: str, token: str, timeout_s: float = 300) -> dict[str, Any]:
    """Swap the application at ``url`` to the index version ``index`` names.

    Args:
        url: the application's base URL, e.g. ``http://127.0.0.1:8000``.
        index: an index version name under the served root, or a manifest path / ``s3://`` URI.
        token: the admin token (the server's ``RETRIEVAL_ADMIN_TOKEN``).
        timeout_s: how long to wait for the whole swap.

    Returns:
        The server's summary ``{"from", "to", "model", "duration_s", "replicas"}``.

    Raises:
        SwapRequestError: a non-2xx reply (the message is the server's error message, with
            the status and type), or no reply at all.
    """
    endpoint = url.rstrip("/") + "/admin/swap"
    summary = _admin_call(endpoint, token=token, body={"index": index}, timeout_s=timeout_s,
                          refused=f"swap to {index!r} refused by {endpoint}")  # fmt: skip
    logger.info("swapped %s -> %s in %.2f s", summary.get("from"), summary.get("to"), summary.get("duration_s", 0.0))
    return summary


def request_status(url: str, *, token: str, timeout_s: float = 30) -> dict[str, Any]:
    """``GET /admin/status`` of the application at ``url``: its swap state and every replica's.

    Raises:
        SwapRequestError: a non-2xx reply (with the server's message) or no reply at all.
    """
    endpoint = url.rstrip("/") + "/admin/status"
    return _admin_call(endpoint, token=token, body=None, timeout_s=timeout_s, refused=f"status refused by {endpoint}")


@dataclass(frozen=True)
class ServedVersions:
    """The index versions a running application holds, as far as its URL tells.

    Attributes:
        active: the version answering queries.
        held: every version any replica holds or is asked to hold (``active``, a swap's
            ``prepared`` and ``retiring`` ones, each replica's ``holds``); only ``active``
            when ``complete`` is False.
        complete: whether ``held`` came from ``/admin/status`` (every replica's state) rather
            than from ``/readyz`` (the active version alone: a swap in progress is not seen).
    """

    active: str
    held: frozenset[str]
    complete: bool


def served_versions(url: str, *, admin_token: str | None, timeout_s: float = 30) -> ServedVersions:
    """What the application at ``url`` serves: ``/admin/status`` with an admin token, else ``/readyz``.

    Raises:
        SwapRequestError: no reply, or an error reply (e.g. a wrong admin token).
    """
    if admin_token:
        status = request_status(url, token=admin_token, timeout_s=timeout_s)
        held = {status.get("active"), status.get("prepared"), status.get("retiring")}
        for replica in (status.get("replicas") or {}).values():
            held.update(replica.get("holds") or [])
            held.add(replica.get("active"))
        active = str(status["active"])
        return ServedVersions(
            active=active, held=frozenset(str(name) for name in held if name) | {active}, complete=True
        )
    endpoint = url.rstrip("/") + "/readyz"
    request = urllib.request.Request(endpoint, method="GET")
    try:
        with _OPENER.open(request, timeout=timeout_s) as response:
            body = json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as error:
        # 503 (not every replica ready) still says which version is active.
        if error.code != 503:
            raise SwapRequestError(f"{endpoint} answered HTTP {error.code}", status=error.code) from None
        body = json.loads(error.read().decode("utf-8"))
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise SwapRequestError(f"cannot reach {endpoint}: {error}") from None
    if not isinstance(body, dict) or not isinstance(body.get("index_version"), str):
        raise SwapRequestError(f"{endpoint}: the reply names no index_version; is this a retrieval application?")
    active = body["index_version"]
    return ServedVersions(active=active, held=frozenset({active}), complete=False)


def _admin_call(
    endpoint: str, *, token: str, body: dict[str, Any] | None, timeout_s: float, refused: str
) -> dict[str, Any]:
    """One admin request (POST with a JSON ``body``, else GET) and its JSON reply.

    Raises:
        SwapRequestError: ``refused`` with the status, the reply's error type and message; or
            no reply at all.
    """
    headers = {"Authorization": f"Bearer {token}"}
    data = None
    if body is not None:
        headers["Content-Type"] = "application/json"
        data = json.dumps(body).encode("utf-8")
    request = urllib.request.Request(endpoint, data=data, headers=headers, method="GET" if body is None else "POST")
    try:
        with _OPENER.open(request, timeout=timeout_s) as response:
            reply: dict[str, Any] = json.loads(response.read().decode("utf-8"))
            return reply
    except urllib.error.HTTPError as error:
        text = error.read().decode("utf-8", errors="replace")
        try:
            detail = json.loads(text)["error"]
            message, error_type = str(detail["message"]), str(detail["type"])
        except (ValueError, KeyError, TypeError):
            message, error_type = text.strip() or str(error.reason), None
        raise SwapRequestError(
            f"{refused} (HTTP {error.code}{', ' + error_type if error_type else ''}): {message}",
            status=error.code,
            error_type=error_type,
        ) from None
    except (urllib.error.URLError, OSError) as error:
        raise SwapRequestError(f"cannot reach {endpoint}: {error}") from None


def resolve_swap_target(target: str, *, index_root: str | None) -> str:
    """The index reference to send for ``retrieval serve swap --to TARGET``.

    Args:
        target: an index version name (sent as it is), or ``model:N``: the newest index
            version under ``index_root`` whose manifest's ``model.version`` is ``N`` (e.g. a
            rollback to the previous champion's index).
        index_root: the served index root, a local folder; needed for ``model:N``.

    Returns:
        The index version name to ask for.

    Raises:
        RetrievalError: ``model:N`` without an index root, or no version built by model version N.
    """
    if not target.startswith("model:"):
        return target
    from retrieval.index.manifest import MANIFEST_FILE, read_manifest

    model_version = target.removeprefix("model:")
    if not index_root:
        raise RetrievalError(f"--to {target} needs --index-root, the folder holding the served index versions")
    root = Path(index_root)
    if not root.is_dir():
        raise RetrievalError(f"--index-root {index_root}: not a local folder")
    found = []
    seen = set()
    for manifest_path in sorted(root.glob(f"*/{MANIFEST_FILE}")):
        try:
            manifest, _ = read_manifest(manifest_path)
        except RetrievalError as error:
            logger.warning("skipping %s: %s", manifest_path, error)
            continue
        seen.add(manifest.model.version)
        if manifest.model.version == model_version:
            found.append((manifest.created_at, manifest.index_version))
    if not found:
        raise RetrievalError(
            f"no index version under {index_root} was built by model version {model_version} "
            f"(model versions there: {', '.join(sorted(seen)) or 'none'})"
        )
    return max(found)[1]

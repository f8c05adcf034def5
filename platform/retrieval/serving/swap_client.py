"""Ask a running search application to swap its live index (``POST /admin/swap``).

Used by ``retrieval serve swap`` and by the incremental runner after a task's model version
passes its gate. The swap itself is a rolling swap (`retrieval.serving.swap`): it returns once
every replica serves the new version and the old one is freed, or fails with the reason while
the old version keeps serving.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval.client import ApiError, RetrievalClient
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
            the status and type), a redirect (never followed: it would carry the token), or no
            reply at all.
    """
    endpoint = url.rstrip("/") + "/admin/swap"
    with _admin_client(url, token, timeout_s) as client:
        summary = _admin_call(lambda: client.swap(index, timeout_s=timeout_s), endpoint,
                              refused=f"swap to {index!r} refused by {endpoint}")  # fmt: skip
    logger.info("swapped %s -> %s in %.2f s", summary.get("from"), summary.get("to"), summary.get("duration_s", 0.0))
    return summary


def request_status(url: str, *, token: str, timeout_s: float = 30) -> dict[str, Any]:
    """``GET /admin/status`` of the application at ``url``: its swap state and every replica's.

    Raises:
        SwapRequestError: a non-2xx reply (with the server's message) or no reply at all.
    """
    endpoint = url.rstrip("/") + "/admin/status"
    with _admin_client(url, token, timeout_s) as client:
        return _admin_call(client.swap_status, endpoint, refused=f"status refused by {endpoint}")


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
    try:
        # A 503 (not every replica ready) still says which version is active: readiness() does not raise on it.
        with RetrievalClient(url, timeout_s=timeout_s, retries=0) as client:
            readiness = client.readiness()
    except ApiError as error:
        if error.status is None:
            raise SwapRequestError(f"cannot reach {endpoint}: {error.reason}") from None
        raise SwapRequestError(f"{endpoint} answered HTTP {error.status}", status=error.status) from None
    except (ValueError, KeyError, TypeError):
        raise SwapRequestError(
            f"{endpoint}: the reply names no index_version; is this a retrieval application?"
        ) from None
    return ServedVersions(active=readiness.index_version, held=frozenset({readiness.index_version}), complete=False)


def _admin_client(url: str, token: str, timeout_s: float) -> RetrievalClient:
    # No retries: an admin call is answered once (a second swap while one runs is refused, not repeated).
    return RetrievalClient(url, admin_token=token, timeout_s=timeout_s, retries=0)


def _admin_call(call: Callable[[], dict[str, Any]], endpoint: str, *, refused: str) -> dict[str, Any]:
    """One admin call through `retrieval.client`, its `ApiError` told as a `SwapRequestError`.

    Raises:
        SwapRequestError: ``refused`` with the status, the reply's error type and message; a
            redirect with where it pointed; or no reply at all.
    """
    try:
        return call()
    except ApiError as error:
        if error.status is None:
            raise SwapRequestError(f"cannot reach {endpoint}: {error.reason}") from None
        if 300 <= error.status < 400:
            raise SwapRequestError(f"{endpoint}: {error.message.split(': ', 1)[1]}", status=error.status) from None
        raise SwapRequestError(
            f"{refused} (HTTP {error.status}{', ' + error.type if error.type else ''}): {error.reason}",
            status=error.status,
            error_type=error.type,
        ) from None


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

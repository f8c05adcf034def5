"""Errors of the search service, each mapped to one HTTP status by `retrieval.serving.http`."""

from __future__ import annotations

from retrieval.errors import BadRequestError, RetrievalError


class VersionNotLoadedError(RetrievalError):
    """A shard or embedder replica was asked for an index version it does not hold.

    The ingress retries such a call (another replica may hold the version, e.g. during a
    rolling swap); a replica never answers with another version's results instead.
    """


class VersionUnavailableError(RetrievalError):
    """No replica answered for the pinned index version after the ingress's retries (503)."""


class ItemNotFoundError(BadRequestError):
    """A request names a gallery id that is not in the index (404)."""


class NotAnImageError(BadRequestError):
    """An upload is empty, not an image Pillow can decode, or a decompression bomb (400)."""


class PayloadTooLargeError(BadRequestError):
    """An upload is bigger than the serving spec's `max_upload_bytes` (413)."""


class BadIndexReferenceError(BadRequestError):
    """A swap request names an index version or manifest that does not exist or is malformed (422)."""


class SwapInProgressError(RetrievalError):
    """A swap was requested while another one runs; one at a time (409)."""


class SwapFailedError(RetrievalError):
    """A swap was refused or aborted; the previous version keeps serving (409). The message says why."""


class MemoryBudgetError(RetrievalError):
    """A replica was asked to load a shard that would not fit in its memory budget."""


class ShardTimeoutError(RetrievalError):
    """A shard did not answer within the request's deadline and the spec asks for an error (504)."""


class ShardUnavailableError(RetrievalError):
    """A shard has no live replica to answer (it died or is restarting); retry later (503)."""


class UnauthorizedError(RetrievalError):
    """A request lacks the bearer token the endpoint requires, or gives a wrong one (401)."""

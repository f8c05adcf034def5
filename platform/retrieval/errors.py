"""The errors the platform raises on bad input. Each names the offending thing.

Everything here derives from `RetrievalError`, so the CLI can print any of them as a
one-line message with a non-zero exit, and the HTTP layer can map them to 4xx replies.
"""

from __future__ import annotations


class RetrievalError(Exception):
    """Base class of the platform's own errors: a clear message for a person."""


class ConfigError(RetrievalError):
    """A job, sweep or serving spec is invalid (unknown key, wrong type, bad value)."""


class DatasetError(RetrievalError):
    """A dataset cannot be read: missing root, empty layout, bad split."""


class CorruptImageError(DatasetError):
    """A file in a dataset (or an upload) is not a readable image."""


class IndexIntegrityError(RetrievalError):
    """An index manifest or shard is missing, malformed or fails its checksum."""


class ModelNotFoundError(RetrievalError):
    """A model URI names no registered model, version, alias or model directory."""


class BadRequestError(RetrievalError):
    """A request to the search service is malformed (wrong vector size, bad k, ...)."""


class IntegrityError(RetrievalError):
    """A stored checkpoint, carry or model package fails its checks (tampered, foreign or corrupt)."""

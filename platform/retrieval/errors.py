"""The errors the platform raises on bad input. Each names the offending thing.

Everything here derives from `RetrievalError`, so the CLI can print any of them as a
one-line message with a non-zero exit, and the HTTP layer can map them to 4xx replies.
"""

from __future__ import annotations

import logging
import re


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


# The user-info part of any URL in a message: everything between "scheme://" and the first "@"
# that has no whitespace or '/' before a ':' (a password may itself hold '/' or ':').
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^@\s/]*:[^@\s]*|[^@\s/:]+)@")


def redact_credentials(text: str) -> str:
    """``text`` with the user and password of every URL in it replaced by ``***``.

    ``postgresql://bob:s3cr/t@db:5432/mlflow`` -> ``postgresql://***@db:5432/mlflow``. It errs on
    the side of hiding: ``https://host:5000/x?to=a@b`` loses ``host:5000/x?to=a`` too.
    """
    return _URL_USERINFO.sub(r"\g<scheme>***@", text)


def url_has_credentials(uri: str) -> bool:
    """Whether ``uri`` carries a user or password (``scheme://user[:password]@host...``)."""
    return redact_credentials(uri) != uri


class RedactCredentials(logging.Filter):
    """A logging filter that removes URL credentials from every record it passes (message and args)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_credentials(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def first_and_last_line(text: str) -> str:
    """Text as one line: its first line, and its last when a (remote) traceback sits between.

    >>> first_and_last_line("Deploying failed:\\nTraceback ...\\n  File 'x.py'\\nValueError: bad")
    'Deploying failed: ... ValueError: bad'
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    first, last = lines[0], lines[-1]
    return first if first == last else f"{first} ... {last}"

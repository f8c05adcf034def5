"""How the `retrieval` command logs: ours at INFO, everyone else's at WARNING, text or JSON lines.

`logging.basicConfig` on the root logger let every library speak at INFO (faiss's loader,
matplotlib's font cache) and ``-v`` turned on DEBUG for boto and urllib3 too. Here the root
logger stays at WARNING and only the ``retrieval`` logger goes to INFO (DEBUG with ``-v``).
Every record passes `RedactCredentials`, so no URL password reaches the output.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Literal, TextIO

from retrieval.errors import RedactCredentials

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_OURS = "retrieval"
_HANDLER_NAME = "retrieval-cli"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, and the traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class _CurrentStderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record is emitted (it may be replaced after set-up)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def configure_logging(*, verbose: bool = False, log_format: LogFormat = "text", stream: TextIO | None = None) -> None:
    """Set up the process's logging for the CLI (replaces the handler an earlier call installed).

    Handlers someone else put on the root logger stay (an embedding program's, a test runner's).

    Args:
        verbose: DEBUG for the platform's own loggers (third-party ones stay at WARNING).
        log_format: ``text`` (human lines) or ``json`` (one object per line, for log shippers).
        stream: where to write (default stderr).
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {list(LOG_FORMATS)}, got {log_format!r}")
    handler = logging.StreamHandler(stream) if stream is not None else _CurrentStderr()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(RedactCredentials())
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    for old in [old for old in root.handlers if old.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger(_OURS).setLevel(logging.DEBUG if verbose else logging.INFO)

"""Logging on stderr: a timestamped text line per action (2026-01-01T12:00:00Z [info] ...), or a JSON object."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any

# A record with `bare` set is a line complete in itself (squid's access.log line carries its own time):
# the text format writes it as it is, the JSON format as the message of an object like the others.
BARE = "bare"
# The structured extras of a record: `extra={"fields": {...}}`; the JSON format writes them as `fields`.
FIELDS = "fields"


def rfc3339(created: float) -> str:
    """UTC with milliseconds, e.g. 2026-12-01T13:16:11.123Z (truncated, as the second is: never 1000 ms)."""
    whole = int(created)
    millis = min(int((created - whole) * 1000), 999)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


def json_line(created: float, level: str, logger: str, message: str, fields: Mapping[str, Any] | None = None,
              exc: str | None = None) -> str:
    """One JSON object on one line (json.dumps escapes newlines inside strings); non-ASCII kept as UTF-8."""
    import json  # only in json mode: text mode, the init container's default, does not pay for it

    record: dict[str, Any] = {"time": rfc3339(created), "level": level, "logger": logger, "message": message}
    if fields:
        record["fields"] = dict(fields)
    if exc:
        record["exc"] = exc
    return json.dumps(record, ensure_ascii=False, default=str)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if getattr(record, BARE, False):
            return message
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created))
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        return f"{stamp} [{record.levelname.lower()}] {message}"


class JsonFormatter(logging.Formatter):
    """One object per record: time, level, logger, message, `fields` where given, `exc` (the traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        exc = None
        if record.exc_info:
            exc = self.formatException(record.exc_info)
        elif record.exc_text:
            exc = record.exc_text
        fields = getattr(record, FIELDS, None)
        return json_line(record.created, record.levelname.lower(), record.name, record.getMessage(),
                         fields if isinstance(fields, Mapping) else None, exc)


def configure(debug: bool = False, log_format: str = "text") -> None:
    """Route the package's logs to stderr; debug adds payloads and skipped steps. In json mode every line
    on stderr must parse: other libraries' records (asyncio's, say), Python's warnings and uncaught exceptions go
    through the same formatter instead of Python's bare last-resort output."""
    logger = logging.getLogger("egress_router")
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else _Formatter())
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    logger.propagate = False
    if log_format == "json":
        root = logging.getLogger()
        root.handlers[:] = [handler]
        root.setLevel(logging.WARNING)
        logging.captureWarnings(True)  # Python's warnings too (logger py.warnings), not printed raw
        sys.excepthook = _log_uncaught


def _log_uncaught(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    logging.getLogger("egress_router").critical("uncaught %s: %s", kind.__name__, value, exc_info=(kind, value, tb))


def error_line(message: str, log_format: str, fields: Mapping[str, Any] | None = None) -> str:
    """The early-error line (before or instead of logging): `error: ...`, or a JSON object in json mode."""
    if log_format == "json":
        return json_line(time.time(), "error", "egress_router", message, fields)
    return f"error: {message}"

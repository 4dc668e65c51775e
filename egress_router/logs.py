"""Logging: one timestamped line per action on stderr (2026-01-01T12:00:00Z [info] ...)."""

from __future__ import annotations

import logging
import sys
import time


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created))
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        return f"{stamp} [{record.levelname.lower()}] {message}"


def configure(debug: bool = False) -> None:
    """Route the package's logs to stderr; debug adds payloads and skipped steps."""
    logger = logging.getLogger("egress_router")
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    logger.propagate = False

"""The rule files' content the running router has in force, recorded for `verify` in the same container.

A long-running mode that reloads its files refuses a bad edit and keeps the old rules; `verify`, run as
the container's probe, must then check the namespace against those rules, not fail on the file. The
record is a small JSON file under /run, written atomically after every applied configuration and only
believed while the process that wrote it is still running (pid and start time).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping

log = logging.getLogger(__name__)

STATE_PATH = "/run/egress-router/in-force.json"


def start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def record(files: Mapping[str, str], path: str = STATE_PATH) -> None:
    """Record `files` (path -> content) as in force; a read-only /run only costs verify this knowledge."""
    body = json.dumps({"pid": os.getpid(), "start": start_time(os.getpid()), "files": dict(files)})
    temporary = f"{path}.{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(body)
        os.replace(temporary, path)
    except OSError as exc:
        log.debug("Could not record the rules in force at %s: %s", path, exc)


def read(path: str = STATE_PATH) -> dict[str, str] | None:
    """The files in force, if a router that is still running recorded them here."""
    try:
        with open(path, encoding="utf-8") as handle:
            state = json.load(handle)
        pid, files = int(state["pid"]), state["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if start_time(pid) is None or start_time(pid) != state.get("start") or not isinstance(files, dict):
        return None
    return {str(name): str(text) for name, text in files.items()}

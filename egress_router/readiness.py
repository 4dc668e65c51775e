"""`egress-router ready`: the exec readiness probe of a high-availability replica (fast: reads one small file).

The router writes its state (STATES) and its pid to EGRESS_HA_STATE_DIR/ha-state, replacing the file whole; the
probe exits 0 only when that says active and the process that wrote it still runs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

STATE_FILE = "ha-state"
DEFAULT_STATE_DIR = "/run/egress-router"  # core.variables.HA_STATE_DIR's default (not imported: the probe is fast)
# each state, with why a replica in it is not ready (ha.Role.current_state decides which)
STATES = {
    "starting": "its keepalived has not reported a state yet: it could not take over now",
    "standby": "another one holds EGRESS_SOURCE",
    "fault": "keepalived is in FAULT: its egress link is down, or it gave way to a second holder of EGRESS_SOURCE",
    "active": "",
    "stopped": "the router is stopping",
}


def write_state(directory: Path, state: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    temporary = directory / f".{STATE_FILE}.{os.getpid()}"
    temporary.write_text(f"{state} {os.getpid()}\n", encoding="ascii")
    temporary.replace(directory / STATE_FILE)


def read_state(directory: Path) -> tuple[str, int] | None:
    """The state and pid the router last wrote in `directory` (None: no state file, or not one the router wrote);
    whether that process still runs is `running`'s answer."""
    try:
        state, pid = (directory / STATE_FILE).read_text(encoding="ascii").split()[:2]
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return (state, int(pid)) if pid.isdigit() else None


def running(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def check(env: Mapping[str, str]) -> tuple[int, str]:
    """(exit code, the line to print): 0 active; 1 any other state, or none yet; 2 not a high-availability router."""
    if not env.get("EGRESS_HA_PEERS", "").strip():
        return 2, ("egress-router ready is the readiness probe of a high-availability replica (EGRESS_HA_PEERS "
                   "set); this container has none: probe the admin port's /ready or run egress-router verify")
    directory = Path(env.get("EGRESS_HA_STATE_DIR", "").strip() or DEFAULT_STATE_DIR)
    try:
        state, pid = (directory / STATE_FILE).read_text(encoding="ascii").split()[:2]
    except (OSError, ValueError):
        return 1, f"not ready: no state in {directory} yet (the router is starting)"
    if not Path(f"/proc/{pid}").exists():
        return 1, f"not ready: the router that wrote {directory / STATE_FILE} (pid {pid}) is gone"
    if state != "active":
        return 1, f"not ready: this replica is {state} ({STATES.get(state, 'a state this version does not know')})"
    return 0, "ready: this replica is active and holds EGRESS_SOURCE"


def main() -> int:
    code, line = check(os.environ)
    (sys.stdout if code == 0 else sys.stderr).write(line + "\n")
    return code

"""The console script's first stop: dispatches on argv, so the container path never imports click.

The init container's runtime is mostly interpreter start-up and imports; click alone costs tens of
milliseconds, and the container behaviour needs none of it. Anything with arguments, and shell
completion (click reads its request from _EGRESS_ROUTER_COMPLETE), goes to the CLI.
"""

from __future__ import annotations

import os
import sys

COMPLETION_VARIABLE = "_EGRESS_ROUTER_COMPLETE"


def main() -> None:
    if len(sys.argv) == 1 and COMPLETION_VARIABLE not in os.environ:
        from .container import run_container

        sys.exit(run_container(os.environ))
    if sys.argv[1:] == ["ready"]:  # an exec probe, run every few seconds: no click, no configuration loading
        from .readiness import main as ready

        sys.exit(ready())
    from .cli import main as cli_main

    cli_main()

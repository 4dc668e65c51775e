"""The console script's first stop: the container path (no arguments) runs without importing click.

The init container's runtime is mostly interpreter start-up and imports; click alone costs tens of
milliseconds, and the container behaviour needs none of it. Anything with arguments goes to cli.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import NoReturn

from .errors import EgressRouterError


def fail(message: str) -> NoReturn:
    sys.stderr.write(f"error: {message}\n")
    sys.exit(1)


def run_container(env: Mapping[str, str]) -> int:
    """The env-driven container behaviour; user errors become one line on stderr and exit 1."""
    from .config import load

    try:
        config = load(env)
        if config.mode == "unit-test":
            from .nat import legacy_lines

            sys.stdout.write("\n".join(legacy_lines(config)) + "\n")
            return 0
        from . import logs

        logs.configure(config.debug)
        for warning in config.warnings:
            logging.getLogger("egress_router").warning("%s", warning)
        if config.configures_network:
            from . import router

            code = router.run(config)
            if code or (config.http_proxy is None and config.dns_proxy is None):
                return code
        if config.http_proxy is not None:
            from .proxy import http

            return http.run_http_proxy(config.http_proxy)
        if config.dns_proxy is not None:
            from .proxy import tcp

            return tcp.run(config.dns_proxy)
        return 0
    except EgressRouterError as exc:
        fail(str(exc))


def main() -> None:
    if len(sys.argv) == 1:
        sys.exit(run_container(os.environ))
    from .cli import main as cli_main

    cli_main()

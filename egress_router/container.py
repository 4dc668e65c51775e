"""The env-driven container path: EGRESS_* variables in, the mode's behaviour out, user errors as one line."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import NoReturn

from .core.errors import EgressRouterError


def fail(message: str) -> NoReturn:
    sys.stderr.write(f"error: {message}\n")
    sys.exit(1)


def run_container(env: Mapping[str, str]) -> int:
    """The container behaviour for `env`; returns the exit code (user errors: one line on stderr, 1)."""
    from .sources import load_config

    try:
        config = load_config(env)
        if config.mode == "unit-test":
            from .core.nat import legacy_lines

            sys.stdout.write("\n".join(legacy_lines(config)) + "\n")
            return 0
        from . import logs

        logs.configure(config.debug)
        for warning in config.warnings:
            logging.getLogger("egress_router").warning("%s", warning)
        from . import router

        return router.run_mode(config, env)
    except EgressRouterError as exc:
        fail(str(exc))

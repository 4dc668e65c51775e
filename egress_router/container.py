"""The env-driven container path: EGRESS_* variables in, the mode's behaviour out, user errors as one line."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, NoReturn

from .core.errors import ConfigError, EgressRouterError

if TYPE_CHECKING:
    from .core.config import RouterConfig


def fail(message: str, log_format: str = "text", fields: Mapping[str, str] | None = None) -> NoReturn:
    """The one-line user error, exit 1: `error: ...`, or in json mode only a JSON object (the same message),
    so that a log pipeline parses every line; kubectl describe shows either as the termination message."""
    from .logs import error_line

    sys.stderr.write(error_line(message, log_format, fields) + "\n")
    sys.exit(1)


def log_format(env: Mapping[str, str]) -> str:
    """EGRESS_LOG_FORMAT, for the error lines too; a bad value is reported (as text) with the other errors."""
    from .core import variables as v

    try:
        return v.LOG_FORMAT.read(env)
    except ConfigError:
        return "text"


def run_container(env: Mapping[str, str]) -> int:
    """The container behaviour for `env`; returns the exit code (user errors: one line on stderr, 1)."""
    from .core import variables as v
    from .sources import load_config

    form = log_format(env)
    try:
        v.LOG_FORMAT.read(env)
        config = load_config(env)
        if config.mode == "unit-test":
            from .core.nat import legacy_lines

            sys.stdout.write("\n".join(legacy_lines(config)) + "\n")
            return 0
        from . import logs

        logs.configure(config.debug, form)
        for warning in config.warnings:
            logging.getLogger("egress_router").warning("%s", warning)
        return run_mode(config, env)
    except EgressRouterError as exc:
        fail(str(exc), form, {"variable": exc.variable} if isinstance(exc, ConfigError) else None)


def run_mode(config: RouterConfig, env: Mapping[str, str]) -> int:
    """The container behaviour of every mode but unit-test: the network first (if configured), then the
    proxy the mode runs (if any); returns the exit code. `env`: what `config` was loaded from (the proxies
    reload their rules from the files it names)."""
    from . import router

    # a proxy's admin port is opened before the network is configured: a port in use changes nothing
    proxy = config.http_proxy is not None or config.dns_proxy is not None
    admin_socket = router.open_admin_port(config.metrics_port) if proxy and config.metrics_port else None
    if config.ha is not None and proxy:
        from .ha_keeper import serve_replica  # the proxy runs as the child of the replica's keeper

        return serve_replica(config, env, admin_socket)
    if config.configures_network:
        router.configure(config, env)
    if config.http_proxy is not None:
        from .proxy.http import run_http_proxy

        return run_http_proxy(config.http_proxy, env, admin_socket)
    if config.dns_proxy is not None:
        from .proxy.dns import run_dns_proxy

        return run_dns_proxy(config.dns_proxy, env, admin_socket)
    return 0

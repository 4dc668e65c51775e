"""The command line: the env-driven container behaviour, plus render, validate and demo for people."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from . import __version__
from .config import DEFAULT_INTERFACE, DEFAULT_MODE, MODES, VARIABLES, RouterConfig, load, variable_modes
from .destinations import GRAMMAR_HELP
from .entry import fail, run_container
from .errors import EgressRouterError
from .plan import build_plan, network_commands
from .proxy.acl import GRAMMAR_HELP as ACL_HELP
from .proxy.dnsdest import GRAMMAR_HELP as DNS_HELP


def _variables_help() -> str:
    return "\n".join(f"  {name}  [default: {default}]\n      {meaning}"
                     for name, (default, meaning) in VARIABLES.items())


HELP = f"""Relay pod traffic to outside servers from one reserved source IP.

\b
With no command, runs the container behaviour driven by the environment:
{_variables_help()}

\b
Modes (EGRESS_ROUTER_MODE):
  init        configure the network and NAT, then exit 0 (the initContainer)
  legacy      the same, then stay up until SIGTERM/SIGINT
  unit-test   print the NAT rules the legacy image printed; change nothing
  http-proxy  configure the network only (no NAT) and exit 0; with
              EGRESS_HTTP_PROXY_DESTINATION set, run the HTTP proxy (see http-proxy --help)
  dns-proxy   configure the network only (no NAT) and exit 0; with
              EGRESS_DNS_PROXY_DESTINATION set, run the TCP proxy (see dns-proxy --help)

\b
EGRESS_DESTINATION grammar:
{GRAMMAR_HELP}

\b
Example:
  EGRESS_SOURCE=192.0.2.99/24 EGRESS_GATEWAY=192.0.2.1 \\
  EGRESS_DESTINATION=$'80 tcp 203.0.113.10\\n8080 tcp 203.0.113.11 80\\n203.0.113.12' \\
  EGRESS_ROUTER_MODE=init egress-router
"""


def guarded(action: Callable[[], Any]) -> Any:
    """Run `action`, turning our own errors into one line on stderr and exit status 1."""
    try:
        return action()
    except EgressRouterError as exc:
        fail(str(exc))


@click.group(invoke_without_command=True, help=HELP, context_settings={"max_content_width": 100})
@click.version_option(__version__, prog_name="egress-router")
@click.pass_context
def main(ctx: click.Context) -> None:
    if ctx.invoked_subcommand is None:
        sys.exit(run_container(os.environ))


def config_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Options that mirror the EGRESS_* variables (an option wins over its variable)."""
    options = [
        click.option("--mode", envvar="EGRESS_ROUTER_MODE", type=click.Choice(MODES),
                     help=f"EGRESS_ROUTER_MODE [default: {DEFAULT_MODE}]"),
        click.option("--pod-interface", envvar="EGRESS_POD_INTERFACE", help="EGRESS_POD_INTERFACE"),
        click.option("--interface", envvar="EGRESS_INTERFACE", help="EGRESS_INTERFACE"),
        click.option("--destination", envvar="EGRESS_DESTINATION", help="EGRESS_DESTINATION (use $'...\\n...')"),
        click.option("--gateway", envvar="EGRESS_GATEWAY", help="EGRESS_GATEWAY"),
        click.option("--source", envvar="EGRESS_SOURCE", help="EGRESS_SOURCE"),
    ]
    for option in options:
        command = option(command)
    return command


def config_from_options(**options: str | None) -> RouterConfig:
    names = {"source": "EGRESS_SOURCE", "gateway": "EGRESS_GATEWAY", "destination": "EGRESS_DESTINATION",
             "interface": "EGRESS_INTERFACE", "pod_interface": "EGRESS_POD_INTERFACE", "mode": "EGRESS_ROUTER_MODE"}
    env = {key: value for key, value in os.environ.items() if key.startswith("EGRESS_")}
    env.update({names[key]: value for key, value in options.items() if value is not None})
    config: RouterConfig = guarded(lambda: load(env))
    return config


@main.command()
@config_options
def render(**options: str | None) -> None:
    """Print what would be applied (network steps and the exact iptables-restore payload). No privileges needed."""
    config = config_from_options(**options)
    if config.source is None:
        click.echo("# no network set-up: EGRESS_SOURCE is unset, only the proxy runs")
        return
    plan = build_plan(config, config.interface or DEFAULT_INTERFACE)
    click.echo(f"# network ({config.mode} mode), as iproute2 commands; applied with netlink")
    click.echo("\n".join(network_commands(plan)))
    if plan.destinations is None:
        click.echo("# no NAT rules in this mode")
        return
    from .nat import render as render_nat
    click.echo("# NAT, applied first, in one transaction: iptables-restore --noflush (jumps only where missing)")
    click.echo(render_nat(plan), nl=False)


def describe(config: RouterConfig) -> str:
    """The one-line summary after 'valid: '."""
    parts = [f"{config.mode} mode"]
    if config.source is not None:
        parts += [f"source {config.source if config.source_has_prefix else config.source.ip}",
                  f"gateway {config.gateway}"]
    else:
        parts.append("no network set-up (proxy only)")
    if config.http_proxy is not None:
        parts.append(f"HTTP proxy on port {config.http_proxy.port}: {config.http_proxy.acl.describe()}")
    if config.dns_proxy is not None:
        parts.append("DNS proxy: " + ", ".join(f"{f.port} -> {f.target()}" for f in config.dns_proxy.forwards))
    if config.destinations is not None:
        fallback = f", fallback {config.destinations.fallback}" if config.destinations.fallback else ", no fallback"
        parts.append(f"{len(config.destinations.rules)} port rule(s){fallback}")
    return "; ".join(parts)


@main.command()
@click.option("-f", "--filename", "filenames", multiple=True, metavar="FILE",
              help="Check the egress-router containers in Kubernetes YAML instead of the environment "
                   "(repeatable; '-' reads stdin; a directory: its .yaml, .yml and .json files).")
@config_options
@click.pass_context
def validate(ctx: click.Context, /, filenames: tuple[str, ...], **options: str | None) -> None:
    """Check the configuration; exit 0 with a one-line summary, or 1 with the error.

    With -f, check every egress-router container in the manifests instead: its environment (env values,
    ConfigMap references), NET_ADMIN, replicas; one line per problem or per valid container.
    """
    if filenames:
        given = [name for name in options if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE]
        if given:
            raise click.UsageError(f"--{given[0].replace('_', '-')} cannot be combined with -f: the manifests "
                                   "give each container its environment")
        sys.exit(validate_manifests(filenames))
    config = config_from_options(**options)
    for warning in config.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo("valid: " + describe(config))


def validate_manifests(filenames: tuple[str, ...]) -> int:
    """Read the files (the only I/O), hand them to the pure check, print its report; the exit status."""
    from .manifests import Finding, check

    sources: list[tuple[str, str]] = []
    unreadable = False
    for name in filenames:
        try:
            sources += read_manifests(name)
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            click.echo(f"{name}: error: cannot read: {reason}", err=True)
            unreadable = True
    report = check(sources)
    for entry in report.entries:
        if isinstance(entry, Finding):
            click.echo(str(entry), err=True)
        elif entry.config is None:
            click.echo(f"{entry.where}: partly checked: the rest needs values only the cluster has (see warnings)")
        else:
            click.echo(f"{entry.where}: valid: {describe(entry.config)}")
    return 1 if unreadable or report.failed else 0


def read_manifests(name: str) -> list[tuple[str, str]]:
    if name == "-":
        return [("<stdin>", sys.stdin.read())]
    path = Path(name)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml", ".json") and p.is_file())
        return [(str(p), p.read_text(encoding="utf-8")) for p in files]
    return [(name, path.read_text(encoding="utf-8"))]


def variables_markdown() -> str:
    """The README's table of every environment variable (a unit test keeps the README equal to it)."""
    rows = ["| variable | modes | default | meaning |", "| --- | --- | --- | --- |"]
    for name, (default, meaning) in VARIABLES.items():
        rows.append(f"| `{name}` | {variable_modes(name)} | {default} | {meaning} |")
    return "\n".join(rows)


@main.command()
@click.option("--markdown", is_flag=True, help="Print a Markdown table (the one in the README).")
def variables(markdown: bool) -> None:
    """List every environment variable: the modes it matters in, its default and its meaning."""
    if markdown:
        click.echo(variables_markdown())
        return
    for name, (default, meaning) in VARIABLES.items():
        click.echo(f"{name}  [default: {default}]  ({variable_modes(name)})\n    {meaning}")


@main.command("http-proxy", help="Run the allow-list HTTP proxy (and first the network set-up, if EGRESS_SOURCE "
              "is set).\n\n\b\nEGRESS_HTTP_PROXY_DESTINATION grammar:\n" + ACL_HELP)
@click.option("--destination", envvar="EGRESS_HTTP_PROXY_DESTINATION", required=True,
              help="EGRESS_HTTP_PROXY_DESTINATION: the allow list (use $'...\\n...')")
@click.option("--port", envvar="EGRESS_HTTP_PROXY_PORT", help="EGRESS_HTTP_PROXY_PORT [default: 8080]")
@click.option("--workers", envvar="EGRESS_HTTP_PROXY_WORKERS",
              help="EGRESS_HTTP_PROXY_WORKERS: a number or auto [default: 1]")
@click.option("--access-log/--no-access-log", default=None, help="EGRESS_HTTP_PROXY_ACCESS_LOG")
@click.option("--connect-timeout", envvar="EGRESS_HTTP_PROXY_CONNECT_TIMEOUT",
              help="EGRESS_HTTP_PROXY_CONNECT_TIMEOUT, seconds [default: 10]")
@click.option("--max-connections", envvar="EGRESS_HTTP_PROXY_MAX_CONNECTIONS",
              help="EGRESS_HTTP_PROXY_MAX_CONNECTIONS [default: 10000]")
@click.option("--grace", envvar="EGRESS_PROXY_GRACE_SECONDS", help="EGRESS_PROXY_GRACE_SECONDS [default: 10]")
def http_proxy(destination: str, port: str | None, workers: str | None, access_log: bool | None,
               connect_timeout: str | None, max_connections: str | None, grace: str | None) -> None:
    env = {key: value for key, value in os.environ.items() if key.startswith("EGRESS_")}
    env["EGRESS_HTTP_PROXY_DESTINATION"] = destination
    env.pop("EGRESS_ROUTER_MODE", None)
    for name, value in (("EGRESS_HTTP_PROXY_PORT", port), ("EGRESS_HTTP_PROXY_WORKERS", workers),
                        ("EGRESS_HTTP_PROXY_CONNECT_TIMEOUT", connect_timeout),
                        ("EGRESS_HTTP_PROXY_MAX_CONNECTIONS", max_connections),
                        ("EGRESS_PROXY_GRACE_SECONDS", grace)):
        if value is not None:
            env[name] = value
    if access_log is not None:
        env["EGRESS_HTTP_PROXY_ACCESS_LOG"] = "1" if access_log else "0"
    sys.exit(run_container(env))



@main.command("dns-proxy", help="Run the TCP forwarding proxy (and first the network set-up, if EGRESS_SOURCE "
              "is set).\n\n\b\nEGRESS_DNS_PROXY_DESTINATION grammar:\n" + DNS_HELP)
@click.option("--destination", envvar="EGRESS_DNS_PROXY_DESTINATION", required=True,
              help="EGRESS_DNS_PROXY_DESTINATION (use $'...\\n...')")
@click.option("--workers", envvar="EGRESS_DNS_PROXY_WORKERS",
              help="EGRESS_DNS_PROXY_WORKERS: a number or auto [default: 1]")
@click.option("--debug/--no-debug", default=None, help="EGRESS_DNS_PROXY_DEBUG: one log line per connection")
def dns_proxy(destination: str, workers: str | None, debug: bool | None) -> None:
    env = {key: value for key, value in os.environ.items() if key.startswith("EGRESS_")}
    env["EGRESS_DNS_PROXY_DESTINATION"] = destination
    env.pop("EGRESS_ROUTER_MODE", None)
    if workers is not None:
        env["EGRESS_DNS_PROXY_WORKERS"] = workers
    if debug is not None:
        env["EGRESS_DNS_PROXY_DEBUG"] = "1" if debug else "0"
    sys.exit(run_container(env))


@main.command()
@click.option("--keep", is_flag=True, help="Leave the lab up (print how to remove it) instead of tearing it down.")
def demo(keep: bool) -> None:
    """Build a namespace lab, run redirect mode in it, send traffic, print where it landed (root)."""
    if os.geteuid() != 0:
        fail("the demo creates network namespaces and needs root (sudo egress-router demo)")
    from .lab import run_demo
    guarded(lambda: run_demo(keep=keep))

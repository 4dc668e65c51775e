"""The command line for people: render, validate, verify, convert, variables, demo and the two proxies' commands.

Every option mirrors an EGRESS_* variable and takes its name, envvar, metavar and shown default from
the registry (core.variables); an option given on the command line wins over its variable, and the
environment the configuration is loaded from is built in one place (`environment`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

from . import __version__
from .container import fail, run_container
from .core import variables as v
from .core.allowlist import GRAMMAR_HELP as ACL_HELP
from .core.config import RouterConfig
from .core.errors import ConfigError, EgressRouterError
from .core.forwards import GRAMMAR_HELP as DNS_HELP
from .core.nat import POD_MARK
from .core.plan import build_plan
from .core.podnet import RETURN_PRIORITY, RETURN_TABLE, PodFacts, parse_nameservers, parse_nameservers6
from .core.redirect import GRAMMAR_HELP
from .core.values import looks_ipv6, parse_ipv4, parse_ipv6
from .core.variables import DEFAULT_INTERFACE, VARIABLES, Variable
from .sources import load_config


def _variables_help() -> str:
    return "\n".join(f"  {name}  [default: {variable.shown_default}]\n      {variable.meaning}"
                     for name, variable in VARIABLES.items())


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

\b
Shell completion (bash, zsh or fish), e.g. in ~/.bashrc:
  eval "$(_EGRESS_ROUTER_COMPLETE=bash_source egress-router)"
"""


def guarded(action: Callable[[], Any]) -> Any:
    """Run `action`, turning our own errors into one line on stderr and exit status 1."""
    try:
        return action()
    except EgressRouterError as exc:
        fail(str(exc))


if TYPE_CHECKING:
    ParamType = click.ParamType[str]
else:  # not subscriptable at run time before click 8.2
    ParamType = click.ParamType


class Text(ParamType):
    """An option's text, passed on to the variable's parser as is, so that a bad value from the
    environment is the usual one-line error naming the variable. Choices (for completion and the
    metavar) are checked here only for values typed on the command line: a usage error, as click does."""

    def __init__(self, metavar: str, choices: tuple[str, ...] = ()):
        self.name = metavar
        self.choices = choices

    def get_metavar(self, param: click.Parameter, *args: Any, **kwargs: Any) -> str:
        return f"[{'|'.join(self.choices)}]" if self.choices else self.name

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        typed = ctx is not None and param is not None and param.name is not None and \
            ctx.get_parameter_source(param.name) is ParameterSource.COMMANDLINE
        if typed and self.choices and value not in self.choices:
            self.fail(f"{value!r} is not one of {', '.join(map(repr, self.choices))}.", param, ctx)
        return value

    def shell_complete(self, ctx: click.Context, param: click.Parameter,
                       incomplete: str) -> list[click.shell_completion.CompletionItem]:
        from click.shell_completion import CompletionItem

        return [CompletionItem(choice) for choice in self.choices if choice.startswith(incomplete)]


class VariableOption(click.Option):
    """An option mirroring a registry variable: click shows the registry's default in its own
    `[default: ...]` place (without the parentheses it puts around descriptive defaults)."""

    def __init__(self, *args: Any, variable: Variable[Any], **kwargs: Any):
        self.variable = variable
        super().__init__(*args, **kwargs)

    def get_help_extra(self, ctx: click.Context) -> Any:
        extra = super().get_help_extra(ctx)
        if not self.required and self.variable.shown_default not in ("", "(unset)"):
            extra["default"] = self.variable.shown_default
        return extra


def option(variable: Variable[Any], *flags: str, help: str = "", **extra: Any) -> Callable[[Any], Any]:
    """A click option mirroring `variable`; its destination is the variable's name, so `environment`
    needs no mapping."""
    return click.option(*flags, variable.name, cls=VariableOption, variable=variable, envvar=variable.name,
                        type=Text(variable.metavar, variable.choices),
                        help=f"{variable.name}: {help or variable.meaning}", **extra)


def flag(variable: Variable[Any], flags: str, help: str = "") -> Callable[[Any], Any]:
    """An on/off option for a boolean variable (unset: the variable decides)."""
    return click.option(flags, variable.name, cls=VariableOption, variable=variable, default=None,
                        help=f"{variable.name}: {help or variable.meaning}")


def environment(options: Mapping[str, str | bool | None], *, without: tuple[str, ...] = ()) -> dict[str, str]:
    """The EGRESS_* environment with the options given on top (None: not given) and `without` removed."""
    env = {key: value for key, value in os.environ.items() if key.startswith("EGRESS_") and key not in without}
    for name, value in options.items():
        if isinstance(value, bool):
            env[name] = "1" if value else "0"
        elif value is not None:
            env[name] = value
    return env


@click.group(invoke_without_command=True, help=HELP, context_settings={"max_content_width": 100})
@click.version_option(__version__, prog_name="egress-router")
@click.pass_context
def main(ctx: click.Context) -> None:
    if ctx.invoked_subcommand is None:
        sys.exit(run_container(os.environ))


CONFIG_OPTIONS = (
    option(v.MODE, "--mode"),
    option(v.POD_INTERFACE, "--pod-interface"),
    option(v.INTERFACE, "--interface"),
    option(v.DESTINATION, "--destination", help="redirect rules, one per line (use $'...\\n...')"),
    option(v.DESTINATION_FILE, "--destination-file"),
    option(v.CONFIG_FILE, "--config-file"),
    option(v.GATEWAY, "--gateway"),
    option(v.SOURCE, "--source"),
    option(v.IPTABLES, "--iptables"),
)


def config_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Options that mirror the network and NAT variables (an option wins over its variable)."""
    for add in reversed(CONFIG_OPTIONS):
        command = add(command)
    return command


def config_from_options(options: Mapping[str, str | None]) -> RouterConfig:
    config: RouterConfig = guarded(lambda: load_config(environment(options)))
    return config


@main.command()
@config_options
@click.option("--pod-next-hop", metavar="ADDRESS|direct[,ADDRESS6]", default=None,
              help="Render the pod-network return path for this next hop of the pod interface (what apply "
                   "reads from the pod's routes; 'direct': a device route; dual-stack: the IPv4 one, a comma, the "
                   "IPv6 one); nameservers from --resolv-conf.")
@click.option("--resolv-conf", metavar="FILE", default="/etc/resolv.conf", show_default=True,
              type=click.Path(dir_okay=False), help="With --pod-next-hop: where the pod's nameservers are.")
def render(pod_next_hop: str | None, resolv_conf: str, **options: str | None) -> None:
    """Print the plan: every step, in the order it is applied (the iptables step as its exact
    iptables-restore payload, the others as their iproute2 equivalents). No privileges needed.

    The pod-network return path depends on the pod's own routes, read when the plan is applied: without
    --pod-next-hop it is summarized in comments; with it, rendered step by step."""
    config = config_from_options(options)
    if not config.configures_network:
        click.echo("# no network set-up: EGRESS_SOURCE is unset, only the proxy runs")
        return
    facts = None if pod_next_hop is None else guarded(lambda: render_facts(pod_next_hop, resolv_conf))
    plan = build_plan(config, config.interface or DEFAULT_INTERFACE, facts)
    restores = " and ".join(f"{nat.tool}-restore --noflush" for nat in plan.nats)
    transactions = "one transaction per family" if len(plan.nats) > 1 else "one transaction"
    click.echo(f"# network ({config.mode} mode): {len(plan.steps)} steps, applied in this order with netlink"
               + (f"; iptables first, in {transactions}: {restores} (jumps only where missing)"
                  if plan.nats else ""))
    if not any(nat.chains for nat in plan.nats):
        click.echo("# no NAT rules in this mode")
    if facts is None and not config.pod_interface.endswith("+"):
        pod = config.pod_interface
        click.echo(f"# + the pod-network return path, planned from {pod}'s routes when applied (--pod-next-hop "
                   "shows it): mark rules in the mangle table,")
        click.echo(f"#   ip route replace default via <{pod}'s next hop> dev {pod} onlink table {RETURN_TABLE}; "
                   f"ip rule add fwmark {POD_MARK:#x}/{POD_MARK:#x} lookup {RETURN_TABLE} priority "
                   f"{RETURN_PRIORITY}; rp_filter=2 on {pod}; routes to the nameservers and EGRESS_CLUSTER_CIDRS "
                   f"via {pod}" + ("; the same for IPv6 (ip -6, ip6tables)" if 6 in config.versions else ""))
    for text in plan.render():
        click.echo(text)


def render_facts(next_hop: str, resolv_conf: str) -> PodFacts:
    """The facts `render --pod-next-hop` stands in for: 'ADDRESS|direct', or one for each family separated by a
    comma ('10.128.0.1,fe80::1'; 'direct' first is IPv4's, second IPv6's)."""
    hops: dict[int, str] = {}
    for item in (part.strip() for part in next_hop.split(",")):
        version = 6 if looks_ipv6(item) or (item == "direct" and 4 in hops) else 4
        if version in hops:
            raise ConfigError("--pod-next-hop", f"{next_hop!r} gives two IPv{version} next hops: one per family")
        hops[version] = item
    gateway = None if hops.get(4, "direct") == "direct" else parse_ipv4(hops[4], "--pod-next-hop")
    gateway6 = None if hops.get(6, "direct") == "direct" else parse_ipv6(hops[6], "--pod-next-hop", link_local=True)
    try:
        text = Path(resolv_conf).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ConfigError("--resolv-conf", f"cannot read {resolv_conf}: {exc.strerror}") from None
    return PodFacts(4 in hops, gateway, parse_nameservers(text), known6=6 in hops, gateway6=gateway6,
                    nameservers6=parse_nameservers6(text))


def describe(config: RouterConfig) -> str:
    """The one-line summary after 'valid: '."""
    parts = [f"{config.mode} mode"]
    if config.egress:
        parts += [f"source {' and '.join(str(e.source if e.has_prefix else e.source.ip) for e in config.egress)}",
                  f"gateway {' and '.join(str(e.gateway) for e in config.egress)}"]
    else:
        parts.append("no network set-up (proxy only)")
    if config.http_proxy is not None:
        parts.append(f"HTTP proxy on port {config.http_proxy.port}: {config.http_proxy.acl.describe()}")
    if config.dns_proxy is not None:
        parts.append("DNS proxy: " + ", ".join(f"{f.port} -> {f.target()}" for f in config.dns_proxy.forwards))
    if config.destinations is not None:
        fallbacks = config.destinations.fallbacks
        fallback = f", fallback {' and '.join(map(str, fallbacks))}" if fallbacks else ", no fallback"
        parts.append(f"{len(config.destinations.rules)} port rule(s){fallback}")
    return "; ".join(parts)


@main.command()
@click.argument("files", nargs=-1, metavar="[FILE]...", type=click.Path())
@click.option("-f", "--filename", "filenames", multiple=True, metavar="FILE", type=click.Path(),
              help="Check the egress-router containers in Kubernetes YAML instead of the environment "
                   "(repeatable, and FILE arguments work too; '-' reads stdin; a directory: its .yaml, "
                   ".yml and .json files).")
@config_options
@click.pass_context
def validate(ctx: click.Context, /, files: tuple[str, ...], filenames: tuple[str, ...],
             **options: str | None) -> None:
    """Check the configuration; exit 0 with a one-line summary, or 1 with the error.

    With files (-f FILE or FILE arguments, e.g. `validate -f examples/*.yaml`), check every
    egress-router container in those manifests instead: its environment (env values, ConfigMap
    references), NET_ADMIN, replicas; one line per problem or per valid container.
    """
    names = filenames + files
    if names:
        given = [name for name in options if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE]
        if given:
            flags = next(param.opts[0] for param in ctx.command.params if param.name == given[0])
            raise click.UsageError(f"{flags} cannot be combined with -f or FILE arguments: the manifests give each "
                                   "container its environment")
        sys.exit(validate_manifests(names))
    config = config_from_options(options)
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
    for name, variable in VARIABLES.items():
        rows.append(f"| `{name}` | {variable.shown_modes()} | {variable.shown_default} | {variable.meaning} |")
    return "\n".join(rows)


@main.command()
@click.option("--markdown", is_flag=True, help="Print a Markdown table (the one in the README).")
def variables(markdown: bool) -> None:
    """List every environment variable: the modes it matters in, its default and its meaning."""
    if markdown:
        click.echo(variables_markdown())
        return
    for name, variable in VARIABLES.items():
        click.echo(f"{name}  [default: {variable.shown_default}]  ({variable.shown_modes()})\n    {variable.meaning}")


@main.command("http-proxy", help="Run the allow-list HTTP proxy (and first the network set-up, if EGRESS_SOURCE "
              "is set).\n\n\b\nEGRESS_HTTP_PROXY_DESTINATION grammar:\n" + ACL_HELP)
@option(v.HTTP_DESTINATION, "--destination", required=True, help="the allow list (use $'...\\n...')")
@option(v.HTTP_PORT, "--port")
@option(v.HTTP_WORKERS, "--workers")
@flag(v.HTTP_ACCESS_LOG, "--access-log/--no-access-log")
@option(v.HTTP_CONNECT_TIMEOUT, "--connect-timeout")
@option(v.HTTP_MAX_CONNECTIONS, "--max-connections")
@option(v.GRACE, "--grace")
def http_proxy(**options: str | bool | None) -> None:
    sys.exit(run_container(environment(options, without=(v.MODE.name,))))


@main.command("dns-proxy", help="Run the TCP forwarding proxy (and first the network set-up, if EGRESS_SOURCE "
              "is set).\n\n\b\nEGRESS_DNS_PROXY_DESTINATION grammar:\n" + DNS_HELP)
@option(v.DNS_DESTINATION, "--destination", required=True, help="TCP forwards, one per line (use $'...\\n...')")
@option(v.DNS_WORKERS, "--workers")
@flag(v.DNS_DEBUG, "--debug/--no-debug")
def dns_proxy(**options: str | bool | None) -> None:
    sys.exit(run_container(environment(options, without=(v.MODE.name,))))


@main.command()
@click.argument("file", metavar="FILE", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--to", "to", required=True, type=click.Choice(("env", "pod", "deployment", "egressrouter")),
              help="What to print: the container's env list, a Pod or a Deployment (each with its macvlan "
                   "NetworkAttachmentDefinition) from an EgressRouter; or an EgressRouter from a Pod or workload.")
@click.option("--image", default=f"egress-router:{__version__}", show_default=True,
              help="The router image (pod, deployment).")
@click.option("--macvlan", type=click.Choice(("multus", "openshift-sdn")), default="multus", show_default=True,
              help="Where the pod's macvlan comes from (pod, deployment): a Multus NetworkAttachmentDefinition, or "
                   "OpenShift SDN's pod.network.openshift.io/assign-macvlan annotation.")
def convert(file: str, to: str, image: str, macvlan: str) -> None:
    """Convert between an EgressRouter object (network.operator.openshift.io/v1, YAML or JSON) and a legacy-style
    router in redirect mode; FILE '-' reads stdin. What one side cannot say is an error naming the field or the
    variable; what is dropped without changing the traffic is a warning on stderr.

    \b
    egress-router convert router.yaml --to deployment > deployment.yaml
    egress-router convert redirect-pod.yaml --to egressrouter"""
    from .convert import convert as run

    def action() -> None:
        try:
            text = sys.stdin.read() if file == "-" else Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(file, f"cannot read it: {reason}") from None
        converted = run("<stdin>" if file == "-" else file, text, to, image=image, macvlan=macvlan)
        for warning in converted.warnings:
            click.echo(f"warning: {warning}", err=True)
        click.echo(converted.text, nl=False)

    guarded(action)


@main.command(help="Exit 0 only on the active replica of a high-availability router (EGRESS_HA_PEERS), its state "
              "converged: the exec readiness probe (reads EGRESS_HA_STATE_DIR/ha-state; 1 otherwise: starting, "
              "standby, fault, stopped; 2 no high availability).")
def ready() -> None:
    from .readiness import main as readiness

    sys.exit(readiness())


@main.command()
@click.option("--keep", is_flag=True, help="Leave the lab up (print how to remove it) instead of tearing it down.")
@click.option("--ipv4-only", is_flag=True, help="An IPv4-only lab and router instead of dual stack.")
def demo(keep: bool, ipv4_only: bool) -> None:
    """Build a dual-stack namespace lab, run redirect mode in it, send traffic, print where it landed (root)."""
    if os.geteuid() != 0:
        fail("the demo creates network namespaces and needs root (sudo egress-router demo)")
    from .lab import run_demo
    guarded(lambda: run_demo(keep=keep, ipv6=not ipv4_only))


# ---------------------------------------------------------------- verify (egress_router/verify.py)

VERIFY_HELP = """Compare the live network namespace with the plan the configuration gives; change nothing.

The plan is built from the same environment and files as the container's own run (so give the router
container's EGRESS_* variables), and every step is read back: addresses, link state, routes, policy
rules, our iptables chains and the jumps to them (nat and mangle tables), sysctls. Each difference is
one line on stdout, 'missing:', 'differs:' or 'extra:' and the command that would repair it, then a
summary line. Reading needs NET_ADMIN when there are iptables rules to read (the router's privileges).

\b
Exit status:
  0  converged: every step holds (also: nothing to verify, e.g. a proxy without EGRESS_SOURCE)
  1  not converged: one line per difference
  2  cannot tell: bad configuration, no privileges to read, missing interface or tool (one error line)

\b
With --output json, stdout is one JSON document whatever verify concludes:
  {"converged": bool, "differences": [{"kind", "step", "detail"}], "error": str|null, "summary": str}
  (a high-availability replica adds "role": "active"|"standby" and "role_line")

A high-availability replica (EGRESS_HA_PEERS) is compared with its role's part of the plan: the active
one holds everything, its reserved addresses with a lifetime; a standby holds no reserved address and
has unreachable default routes. The role is what the running router wrote in EGRESS_HA_STATE_DIR;
with no router running that is exit 2, unless --role names the role to compare with.

Usable as an exec readiness or liveness probe of a long-running router container (legacy mode, or a
proxy mode with EGRESS_SOURCE), and through `kubectl debug` for a pod whose router ran as an init
container (see the README, 'Verifying a router')."""


@main.command(help=VERIFY_HELP)
@config_options
@click.option("--output", "output", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="text: one line per difference and a summary; json: one document.")
@click.option("--role", type=click.Choice(["active", "standby"]), default=None,
              help="High availability: compare with this role's part of the plan instead of the running router's "
                   "(e.g. a namespace inspected with no router running).")
def verify(output: str, role: str | None, **options: str | None) -> None:
    from .verify import verify as compare_live

    report = compare_live(environment(options), role)
    if output == "json":
        click.echo(report.json())
    elif report.error is not None:
        click.echo(f"error: {report.error}", err=True)
    else:
        for line in report.lines():
            click.echo(line)
    sys.exit(report.exit_code)

"""The command line: unit-test mode, render, validate, help and version, and clean one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from egress_router import __version__
from egress_router.cli import main

ROOT = Path(__file__).resolve().parents[2]
CONSOLE_SCRIPT = ROOT / ".venv" / "bin" / "egress-router"

LEGACY_ENV = {
    "EGRESS_ROUTER_MODE": "unit-test",
    "EGRESS_SOURCE": "1.2.3.4",
    "EGRESS_GATEWAY": "1.1.1.1",
    "EGRESS_DESTINATION": "80 tcp 10.4.5.6\n8080 tcp 10.7.8.9 80\n10.1.2.3",
}
LEGACY_STDOUT = (
    "-A PREROUTING -i eth0 -p tcp --dport 80 -j DNAT --to-destination 10.4.5.6\n"
    "-A PREROUTING -i eth0 -p tcp --dport 8080 -j DNAT --to-destination 10.7.8.9:80\n"
    "-A PREROUTING -i eth0 -j DNAT --to-destination 10.1.2.3\n"
    "-A POSTROUTING -j SNAT --to-source 1.2.3.4\n"
)

INIT_ENV = {
    "EGRESS_ROUTER_MODE": "init",
    "EGRESS_SOURCE": "192.0.2.99/24",
    "EGRESS_GATEWAY": "192.0.2.1",
    "EGRESS_DESTINATION": "80 tcp 203.0.113.10\n8080 tcp 203.0.113.11 80\n203.0.113.12",
}


@pytest.fixture(autouse=True)
def no_egress_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """CliRunner merges env= into os.environ: make sure none of the caller's EGRESS_* variables leak in."""
    for name in list(os.environ):
        if name.startswith("EGRESS_"):
            monkeypatch.delenv(name)


def invoke(args: list[str], env: Mapping[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, args, env=dict(env or {}))


def assert_one_line_error(result: Result, *fragments: str) -> str:
    """Exit 1, nothing on stdout, exactly one 'error: ' line on stderr (no traceback)."""
    assert result.exit_code == 1, (result.stdout, result.stderr, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not an escaped exception
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


# ---------------------------------------------------------------- container behaviour (no command)


def test_unit_test_mode_prints_exactly_the_legacy_lines() -> None:
    result = invoke([], LEGACY_ENV)
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert result.stdout == LEGACY_STDOUT
    assert result.stderr == ""


def test_unit_test_mode_stdout_is_only_rules_even_with_a_typo_variable() -> None:
    result = invoke([], {**LEGACY_ENV, "EGRESS_DESTINATIONS": "x"})
    assert result.exit_code == 0
    assert result.stdout == LEGACY_STDOUT


def test_unit_test_mode_with_mixed_case_and_comments() -> None:
    messy = "# web\r\n80 TCP 10.4.5.6  # a\r\n\r\n8080\ttcp\t10.7.8.9\t80\r\n10.1.2.3\r\n"
    env = {**LEGACY_ENV, "EGRESS_DESTINATION": messy}
    result = invoke([], env)
    assert result.exit_code == 0
    assert result.stdout == LEGACY_STDOUT


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [
        ({"EGRESS_DESTINATION": "80 tcp 10.4.5.6\n8080 tcp 10.7.8.300 80"},
         ["EGRESS_DESTINATION line 2: ", "'8080 tcp 10.7.8.300 80'", "10.7.8.300"]),
        ({"EGRESS_DESTINATION": "# c\n\n0 tcp 10.4.5.6"}, ["EGRESS_DESTINATION line 3: ", "'0 tcp 10.4.5.6'"]),
        ({"EGRESS_DESTINATION": "10.1.2.3\n80 tcp 10.4.5.6"},
         ["EGRESS_DESTINATION line 2: ", "'80 tcp 10.4.5.6'", "fallback"]),
        ({"EGRESS_DESTINATION": "80 quic 10.4.5.6"}, ["EGRESS_DESTINATION line 1: ", "'quic'"]),
        ({"EGRESS_DESTINATION": "80\x1btcp 10.4.5.6"}, ["EGRESS_DESTINATION line 1: ", "\\x1b"]),
        ({"EGRESS_DESTINATION": "   "}, ["error: EGRESS_DESTINATION: is empty"]),
        ({"EGRESS_SOURCE": None}, ["error: EGRESS_SOURCE: is not set"]),
        ({"EGRESS_SOURCE": "1.2.3.4/33"}, ["EGRESS_SOURCE: ", "'33'"]),
        ({"EGRESS_GATEWAY": "1.2.3.4"}, ["EGRESS_GATEWAY: ", "same address as EGRESS_SOURCE"]),
        ({"EGRESS_ROUTER_MODE": "unittest"}, ["EGRESS_ROUTER_MODE: ", "'unittest'"]),
        ({"EGRESS_ROUTER_MODE": None, "EGRESS_DESTINATION": "0 tcp 10.4.5.6"}, ["EGRESS_DESTINATION line 1: "]),
        ({"EGRESS_POD_INTERFACE": "eth/0"}, ["EGRESS_POD_INTERFACE: ", "'eth/0'"]),
    ],
)
def test_bad_config_is_one_line_on_stderr(changes: dict[str, str | None], fragments: list[str]) -> None:
    env = {k: v for k, v in {**LEGACY_ENV, **changes}.items() if v is not None}
    assert_one_line_error(invoke([], env), *fragments)


def test_huge_port_number_is_a_clean_error() -> None:
    env = {**LEGACY_ENV, "EGRESS_DESTINATION": "9" * 5000 + " tcp 10.4.5.6"}
    assert_one_line_error(invoke([], env), "EGRESS_DESTINATION line 1: ")


def test_empty_environment_is_a_clean_error() -> None:
    assert_one_line_error(invoke([], {}), "error: EGRESS_SOURCE: is not set")


# ---------------------------------------------------------------- render


RENDER_NETWORK = [
    "ip address add 192.0.2.99/24 dev macvlan0",
    "ip link set macvlan0 up",
    "ip route replace 192.0.2.1/32 dev macvlan0 scope link",
    "ip route replace default via 192.0.2.1 dev macvlan0",
    "sysctl -w net.ipv4.ip_forward=1",
]
RENDER_NAT = [
    "*nat",
    ":EGRESS-ROUTER-DNAT - [0:0]",
    ":EGRESS-ROUTER-SNAT - [0:0]",
    "-A EGRESS-ROUTER-DNAT -i eth0 -p tcp -m tcp --dport 80 -j DNAT --to-destination 203.0.113.10",
    "-A EGRESS-ROUTER-DNAT -i eth0 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 203.0.113.11:80",
    "-A EGRESS-ROUTER-DNAT -i eth0 -j DNAT --to-destination 203.0.113.12",
    "-A EGRESS-ROUTER-SNAT -o macvlan0 -j SNAT --to-source 192.0.2.99",
    "-A PREROUTING -j EGRESS-ROUTER-DNAT",
    "-A POSTROUTING -j EGRESS-ROUTER-SNAT",
    "COMMIT",
]


def check_render(result: Result) -> list[str]:
    assert result.exit_code == 0, (result.stderr, result.exception)
    lines = result.stdout.splitlines()
    for line in RENDER_NETWORK:
        assert line in lines
    assert any(line.startswith("arping ") and "192.0.2.99" in line for line in lines)
    nat_start = lines.index("*nat")
    # the steps in the order they are applied: the NAT transaction first, then the network
    assert lines[nat_start:nat_start + len(RENDER_NAT)] == RENDER_NAT
    assert lines[nat_start + len(RENDER_NAT):-1] == RENDER_NETWORK
    assert lines[0].startswith("# network (init mode)")
    assert all(line.startswith("# ") for line in lines[:nat_start])
    return lines


def test_render_from_environment() -> None:
    check_render(invoke(["render"], INIT_ENV))


def test_render_from_options() -> None:
    check_render(invoke([
        "render", "--source", "192.0.2.99/24", "--gateway", "192.0.2.1", "--mode", "init",
        "--destination", "80 tcp 203.0.113.10\n8080 tcp 203.0.113.11 80\n203.0.113.12",
    ]))


def test_render_options_win_over_environment() -> None:
    env = {**INIT_ENV, "EGRESS_SOURCE": "198.51.100.5", "EGRESS_INTERFACE": "net9"}
    lines = invoke(["render", "--source", "192.0.2.99/24", "--interface", "net1"], env).stdout.splitlines()
    assert "ip address add 192.0.2.99/24 dev net1" in lines
    assert "-A EGRESS-ROUTER-SNAT -o net1 -j SNAT --to-source 192.0.2.99" in lines
    assert not any("198.51.100.5" in line or "net9" in line for line in lines)


def test_render_pod_interface() -> None:
    lines = invoke(["render", "--pod-interface", "veth+"], INIT_ENV).stdout.splitlines()
    dnat = [line for line in lines if line.startswith("-A EGRESS-ROUTER-DNAT")]
    assert len(dnat) == 3
    assert all(line.startswith("-A EGRESS-ROUTER-DNAT -i veth+ ") for line in dnat)


@pytest.mark.parametrize("mode", ["http-proxy", "dns-proxy"])
def test_render_proxy_mode_has_no_nat(mode: str) -> None:
    env = {k: v for k, v in INIT_ENV.items() if k != "EGRESS_DESTINATION"}
    result = invoke(["render", "--mode", mode], env)
    assert result.exit_code == 0
    assert "ip route replace default via 192.0.2.1 dev macvlan0" in result.stdout.splitlines()
    assert "# no NAT rules in this mode" in result.stdout
    assert "*nat" not in result.stdout


def test_render_bad_config() -> None:
    assert_one_line_error(invoke(["render", "--destination", "80 tcp 10.0.0.1\n80 tcp 10.0.0.2"], INIT_ENV),
                          "EGRESS_DESTINATION line 2: ", "'80 tcp 10.0.0.2'", "already redirected on line 1")


def test_render_invalid_mode_option_is_a_usage_error() -> None:
    result = invoke(["render", "--mode", "bogus"], INIT_ENV)
    assert result.exit_code == 2
    assert "bogus" in result.stderr
    assert result.stdout == ""


# ---------------------------------------------------------------- validate


@pytest.mark.parametrize(
    ("args", "changes", "summary"),
    [
        ([], {}, "valid: init mode; source 192.0.2.99/24; gateway 192.0.2.1; 2 port rule(s), fallback 203.0.113.12"),
        ([], {"EGRESS_SOURCE": "192.0.2.99"},
         "valid: init mode; source 192.0.2.99; gateway 192.0.2.1; 2 port rule(s), fallback 203.0.113.12"),
        ([], {"EGRESS_DESTINATION": "53 udp 10.0.0.53"},
         "valid: init mode; source 192.0.2.99/24; gateway 192.0.2.1; 1 port rule(s), no fallback"),
        (["--mode", "legacy"], {}, "valid: legacy mode; source 192.0.2.99/24; gateway 192.0.2.1; "
                                   "2 port rule(s), fallback 203.0.113.12"),
        (["--mode", "dns-proxy"], {"EGRESS_DESTINATION": None}, "valid: dns-proxy mode; source 192.0.2.99/24; "
                                                                 "gateway 192.0.2.1"),
    ],
)
def test_validate_ok(args: list[str], changes: dict[str, str | None], summary: str) -> None:
    env = {k: v for k, v in {**INIT_ENV, **changes}.items() if v is not None}
    result = invoke(["validate", *args], env)
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert result.stdout == summary + "\n"


def test_validate_from_options_only() -> None:
    result = invoke(["validate", "--source", "10.0.0.5", "--gateway", "10.0.0.1", "--destination", "10.9.9.9"])
    assert result.exit_code == 0
    # no --mode and no EGRESS_ROUTER_MODE: the container's default mode, legacy
    assert result.stdout == "valid: legacy mode; source 10.0.0.5; gateway 10.0.0.1; 0 port rule(s), fallback 10.9.9.9\n"


@pytest.mark.parametrize("command", ["render", "validate"])
def test_default_mode_is_the_containers(command: str) -> None:
    env = {k: v for k, v in INIT_ENV.items() if k != "EGRESS_ROUTER_MODE"}
    result = invoke([command], env)
    assert result.exit_code == 0, result.stderr
    assert "legacy mode" in result.stdout.splitlines()[0]


def test_mode_option_wins_over_environment() -> None:
    result = invoke(["validate", "--mode", "dns-proxy"], {**INIT_ENV, "EGRESS_ROUTER_MODE": "legacy"})
    assert result.exit_code == 0
    assert result.stdout.startswith("valid: dns-proxy mode;")


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [
        ({"EGRESS_DESTINATION": "80 tcp 10.0.0.1\n\n80 tcp 10.0.0.1 8080 9"}, ["EGRESS_DESTINATION line 3: ",
                                                                              "'80 tcp 10.0.0.1 8080 9'"]),
        ({"EGRESS_GATEWAY": "192.0.2.255"}, ["EGRESS_GATEWAY: ", "broadcast"]),
        ({"EGRESS_SOURCE": None}, ["error: EGRESS_SOURCE: is not set"]),
        ({"EGRESS_INTERFACE": "a-very-long-interface-name"}, ["EGRESS_INTERFACE: "]),
    ],
)
def test_validate_error(changes: dict[str, str | None], fragments: list[str]) -> None:
    env = {k: v for k, v in {**INIT_ENV, **changes}.items() if v is not None}
    assert_one_line_error(invoke(["validate"], env), *fragments)


def test_validate_warns_about_a_misspelt_variable() -> None:
    """`validate` prints config.warnings: a typo'd EGRESS_* variable in the environment must show up there."""
    result = invoke(["validate"], {**INIT_ENV, "EGRESS_DESTINATIONS": "80 tcp 10.0.0.1"})
    assert result.exit_code == 0
    assert "warning: EGRESS_DESTINATIONS" in result.stderr
    assert "did you mean EGRESS_DESTINATION?" in result.stderr


# ---------------------------------------------------------------- help and version


def test_help_teaches_the_grammar() -> None:
    result = invoke(["--help"])
    assert result.exit_code == 0
    text = result.stdout
    assert "<port> <proto> <ip>" in text
    assert "<port> <proto> <ip> <remote_port>" in text
    assert "fallback" in text
    assert "tcp, udp or sctp" in text
    for name in ("EGRESS_SOURCE", "EGRESS_GATEWAY", "EGRESS_DESTINATION", "EGRESS_ROUTER_MODE",
                 "EGRESS_INTERFACE", "EGRESS_POD_INTERFACE", "EGRESS_ROUTER_DEBUG"):
        assert name in text
    for mode in ("init", "legacy", "unit-test", "http-proxy", "dns-proxy"):
        assert mode in text
    for command in ("render", "validate", "demo"):
        assert command in text


@pytest.mark.parametrize("command", ["render", "validate"])
def test_subcommand_help_lists_options(command: str) -> None:
    result = invoke([command, "--help"])
    assert result.exit_code == 0
    for option in ("--source", "--gateway", "--destination", "--mode", "--interface", "--pod-interface"):
        assert option in result.stdout


def test_version() -> None:
    result = invoke(["--version"])
    assert result.exit_code == 0
    assert result.stdout == f"egress-router, version {__version__}\n"
    assert __version__ == "0.1.0"


# ---------------------------------------------------------------- the real console script


def clean_env(**variables: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8", **variables}


@pytest.mark.skipif(not CONSOLE_SCRIPT.exists(), reason=f"{CONSOLE_SCRIPT} is not installed")
def test_console_script_unit_test_mode() -> None:
    done = subprocess.run([str(CONSOLE_SCRIPT)], env=clean_env(**LEGACY_ENV), capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == LEGACY_STDOUT
    assert done.stderr == ""


@pytest.mark.skipif(not CONSOLE_SCRIPT.exists(), reason=f"{CONSOLE_SCRIPT} is not installed")
def test_console_script_error_goes_to_stderr_only() -> None:
    env = clean_env(**{**LEGACY_ENV, "EGRESS_DESTINATION": "80 tcp 10.4.5.6\n80 tcp 10.4.5.7"})
    done = subprocess.run([str(CONSOLE_SCRIPT)], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "error: EGRESS_DESTINATION line 2: '80 tcp 10.4.5.7': tcp port 80 is already redirected on line 1"
    ]


def test_python_dash_m() -> None:
    done = subprocess.run([sys.executable, "-m", "egress_router", "--version"], env=clean_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"egress-router, version {__version__}\n"


# ---------------------------------------------------------------- options from the registry


@pytest.mark.parametrize("command", ["render", "validate"])
def test_iptables_option(command: str) -> None:
    assert invoke([command, "--iptables", "legacy"], INIT_ENV).exit_code == 0
    refused = invoke([command, "--iptables", "iptables"], INIT_ENV)
    assert refused.exit_code == 2
    assert "'iptables' is not one of 'nft', 'legacy', 'auto'" in refused.stderr
    # the option wins over a bad variable, and the variable is still checked without it
    assert invoke([command, "--iptables", "nft"], {**INIT_ENV, "EGRESS_IPTABLES": "bogus"}).exit_code == 0
    assert_one_line_error(invoke([command], {**INIT_ENV, "EGRESS_IPTABLES": "bogus"}), "EGRESS_IPTABLES: 'bogus'")


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        ("http-proxy", ["--port PORT", "--workers N|auto", "--connect-timeout SECONDS", "--max-connections N",
                        "--grace SECONDS", "[default: 8080]", "[default: 10000]"]),
        ("dns-proxy", ["--workers N|auto", "--destination RULES"]),
        ("render", ["--source ADDRESS[/PREFIX]", "--pod-interface NAME", "[default: eth0]", "[default: nft]"]),
    ],
)
def test_help_shows_kinds_and_registry_defaults(command: str, shown: list[str]) -> None:
    text = " ".join(invoke([command, "--help"]).stdout.split())  # undo click's wrapping
    for fragment in shown:
        assert fragment in text
    assert " TEXT " not in text
    assert "[default: (" not in text.replace("[default: (required", "").replace("[default: (off)", "")


def test_every_option_names_its_variable_and_reads_it() -> None:
    """An option's envvar is its registry variable, so the variable works wherever the option does."""
    from egress_router.cli import main as group
    from egress_router.core.variables import VARIABLES

    seen = set()
    for command in group.commands.values():
        for param in command.params:
            if isinstance(param, click.Option) and param.envvar:
                assert param.envvar in VARIABLES, (command.name, param.opts)
                assert param.name == param.envvar
                seen.add(param.envvar)
    assert {"EGRESS_SOURCE", "EGRESS_IPTABLES", "EGRESS_HTTP_PROXY_PORT", "EGRESS_DNS_PROXY_WORKERS"} <= seen

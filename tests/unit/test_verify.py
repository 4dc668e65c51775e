"""verify's pure parts: NAT differences from a parsed iptables-save, the report, the CLI's exit codes and JSON."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from egress_router.cli import main
from egress_router.core.nat import DNAT_CHAIN, MARK_CHAIN, SNAT_CHAIN, NatRules, parse_save
from egress_router.testinfra_plugin import RouterState, router_state, verify_command
from egress_router.verify import Difference, Report, table_differences, verify

NAT = NatRules(((DNAT_CHAIN, ("-i eth0 -p tcp -m tcp --dport 80 -j DNAT --to-destination 203.0.113.10",
                              "-i eth0 -j DNAT --to-destination 203.0.113.12")),
                (SNAT_CHAIN, ("-o macvlan0 -j SNAT --to-source 192.0.2.99",))),
               ((MARK_CHAIN, ("-i eth0 -j CONNMARK --set-xmark 0x2000000/0x2000000",)),))
CONVERGED = f"""*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:{DNAT_CHAIN} - [0:0]
:{SNAT_CHAIN} - [0:0]
-A PREROUTING -j {DNAT_CHAIN}
-A POSTROUTING -j {SNAT_CHAIN}
-A {DNAT_CHAIN} -i eth0 -p tcp -m tcp --dport 80 -j DNAT --to-destination 203.0.113.10
-A {DNAT_CHAIN} -i eth0 -j DNAT --to-destination 203.0.113.12
-A {SNAT_CHAIN} -o macvlan0 -j SNAT --to-source 192.0.2.99
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:{MARK_CHAIN} - [0:0]
-A PREROUTING -j {MARK_CHAIN}
-A OUTPUT -j {MARK_CHAIN}
-A {MARK_CHAIN} -i eth0 -j CONNMARK --set-xmark 0x2000000/0x2000000
COMMIT
"""
ENV = {"EGRESS_SOURCE": "192.0.2.99/24", "EGRESS_GATEWAY": "192.0.2.1", "EGRESS_DESTINATION": "203.0.113.12"}


def lines(save_text: str) -> list[str]:
    return [d.line() for d in table_differences(NAT, parse_save(save_text))]


def test_converged_tables_have_no_differences() -> None:
    assert lines(CONVERGED) == []


def test_an_absent_chain_is_one_line_with_its_rule_count_and_missing_jumps_are_named() -> None:
    assert lines("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n") == [
        f"missing: iptables -t nat -N {DNAT_CHAIN} (the chain and its 2 rule(s))",
        f"missing: iptables -t nat -N {SNAT_CHAIN} (the chain and its 1 rule(s))",
        f"missing: iptables -t nat -A PREROUTING -j {DNAT_CHAIN}",
        f"missing: iptables -t nat -A POSTROUTING -j {SNAT_CHAIN}",
        f"missing: iptables -t mangle -N {MARK_CHAIN} (the chain and its 1 rule(s))",
        f"missing: iptables -t mangle -A PREROUTING -j {MARK_CHAIN}",
        f"missing: iptables -t mangle -A OUTPUT -j {MARK_CHAIN}",
    ]


def test_missing_and_extra_rules_and_doubled_jumps() -> None:
    drifted = CONVERGED.replace("--to-destination 203.0.113.10", "--to-destination 203.0.113.66").replace(
        f"-A OUTPUT -j {MARK_CHAIN}\n", f"-A OUTPUT -j {MARK_CHAIN}\n-A OUTPUT -j {MARK_CHAIN}\n")
    assert lines(drifted) == [
        f"missing: iptables -t nat -A {DNAT_CHAIN} -i eth0 -p tcp -m tcp --dport 80 -j DNAT --to-destination "
        "203.0.113.10",
        f"extra: iptables -t nat -D {DNAT_CHAIN} -i eth0 -p tcp -m tcp --dport 80 -j DNAT --to-destination "
        "203.0.113.66",
        f"extra: iptables -t mangle -D OUTPUT -j {MARK_CHAIN} (2 copies of the jump)",
    ]


def test_the_same_rules_in_another_order_differ() -> None:
    first = "-i eth0 -p tcp -m tcp --dport 80 -j DNAT --to-destination 203.0.113.10"
    second = "-i eth0 -j DNAT --to-destination 203.0.113.12"
    swapped = CONVERGED.replace(f"-A {DNAT_CHAIN} {first}\n-A {DNAT_CHAIN} {second}",
                                f"-A {DNAT_CHAIN} {second}\n-A {DNAT_CHAIN} {first}")
    assert swapped != CONVERGED
    assert lines(swapped) == [f"differs: iptables -t nat chain {DNAT_CHAIN} (the same 2 rule(s) in another order "
                              "or with duplicates)"]


def test_other_owners_chains_and_rules_are_not_differences() -> None:
    theirs = CONVERGED.replace("COMMIT\n*mangle", ":ISTIO_REDIRECT - [0:0]\n-A PREROUTING -p tcp -j ISTIO_REDIRECT\n"
                               "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001\nCOMMIT\n*mangle")
    assert lines(theirs) == []


def test_report_exit_codes_text_and_json() -> None:
    differs = Report((Difference("missing", "ip address add 192.0.2.99/24 dev macvlan0"),
                      Difference("differs", "sysctl -w net.ipv4.ip_forward=1", "found 0")), summary="not converged")
    assert (differs.exit_code, differs.converged) == (1, False)
    assert differs.lines() == ["missing: ip address add 192.0.2.99/24 dev macvlan0",
                               "differs: sysctl -w net.ipv4.ip_forward=1 (found 0)", "not converged"]
    assert json.loads(differs.json())["differences"][1] == {
        "kind": "differs", "step": "sysctl -w net.ipv4.ip_forward=1", "detail": "found 0"}
    assert (Report(summary="converged").exit_code, Report(error="x").exit_code) == (0, 2)
    assert Report(error="x").converged is False


def test_a_bad_configuration_is_an_error_before_anything_is_read() -> None:
    report = verify({**ENV, "EGRESS_SOURCE": "192.0.2.300"})
    assert report.exit_code == 2 and report.differences == ()
    assert report.error == "EGRESS_SOURCE: '192.0.2.300' is not an IPv4 address"


def test_nothing_to_verify_without_a_network_set_up() -> None:
    assert verify({"EGRESS_HTTP_PROXY_DESTINATION": "203.0.113.10"}).summary == (
        "converged: nothing to verify (EGRESS_SOURCE is unset, the network is not configured (proxy only))")
    unit = verify({**ENV, "EGRESS_ROUTER_MODE": "unit-test"})
    assert (unit.exit_code, unit.summary) == (0, "converged: nothing to verify (unit-test mode changes nothing)")


def test_cli_bad_configuration_exits_2_with_one_line_or_one_json_document() -> None:
    runner = CliRunner()
    bad = {**ENV, "EGRESS_DESTINATION": "80 tcp 10.0.0"}
    result = runner.invoke(main, ["verify"], env=bad)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == "error: EGRESS_DESTINATION line 1: '80 tcp 10.0.0': '10.0.0' is not an IPv4 address\n"
    result = runner.invoke(main, ["verify", "--output", "json"], env=bad)
    assert result.exit_code == 2 and result.stderr == ""
    assert json.loads(result.stdout) == {"converged": False, "differences": [], "summary": "",
                                         "error": "EGRESS_DESTINATION line 1: '80 tcp 10.0.0': '10.0.0' is not an "
                                                  "IPv4 address"}


def test_cli_help_documents_the_exit_codes_and_the_json_document() -> None:
    text = CliRunner().invoke(main, ["verify", "--help"]).output
    for expected in ("0  converged", "1  not converged", "2  cannot tell", '"converged": bool', "--output [text|json]",
                     "--destination-file"):
        assert expected in text


# ---------------------------------------------------------------- the pytest plugin's command (no router needed)

AWKWARD = "# partner's \"API\" $HOME `id` \\ ; & |\n80 tcp 203.0.113.10\n"
FAKE_VERIFY = """#!{python}
import json, os, sys
assert sys.argv[1:] == ["verify", "--output", "json"], sys.argv
seen = {{"env": sorted(os.environ), "rules": os.environ.get("EGRESS_DESTINATION")}}
print(json.dumps({{"converged": True, "differences": [], "error": None, "summary": json.dumps(seen)}}))
"""


def test_the_plugin_passes_exactly_the_given_variables_quoted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import testinfra

    fake = tmp_path / "egress-router"
    fake.write_text(FAKE_VERIFY.format(python=sys.executable))
    fake.chmod(0o755)
    monkeypatch.setenv("EGRESS_GATEWAY", "192.0.2.254")  # the runner's own: not passed on
    state = router_state(testinfra.get_host("local://"), {"EGRESS_DESTINATION": AWKWARD, "EGRESS_SOURCE": "x y"},
                         command=str(fake))
    seen = json.loads(state.summary)
    assert seen["rules"] == AWKWARD
    assert [name for name in seen["env"] if name not in ("PWD", "SHLVL", "_", "LC_CTYPE")] == [
        "EGRESS_DESTINATION", "EGRESS_SOURCE", "PATH"]
    assert verify_command({"EGRESS_SOURCE": "x y"}, netns="egr-1") == (
        "ip netns exec egr-1 env -i \"PATH=$PATH\" 'EGRESS_SOURCE=x y' egress-router verify --output json")
    assert verify_command() == "egress-router verify --output json"


def test_the_plugins_failure_message_lists_each_difference_on_its_own_line() -> None:
    state = RouterState("docker://router", False, ({"kind": "missing", "step": "ip rule add x", "detail": ""},
                                                   {"kind": "differs", "step": "sysctl -w a=1", "detail": "found 0"}),
                        None, "not converged: 2 of 11 steps do not hold", 1)
    assert state.failure().splitlines() == [
        "egress router on docker://router is not as configured: not converged: 2 of 11 steps do not hold",
        "  missing: ip rule add x", "  differs: sysctl -w a=1 (found 0)"]
    assert RouterState("h", False, (), "EGRESS_SOURCE: bad", "", 2).failure() == \
        "egress-router verify on h cannot tell: EGRESS_SOURCE: bad"


def test_a_step_that_does_not_hold_is_never_explained_away() -> None:
    """A step drift reported but whose explanation finds nothing (the state changed between the two reads) is
    still one line: the step itself."""
    from ipaddress import IPv4Network

    from egress_router.core.steps import PruneRoutes
    from egress_router.verify import explain

    class NoRoutes:
        def routes(self, table: int = 254, family: int = 2) -> list[object]:
            return []

    class Context:
        rtnl = NoRoutes()

        def index(self, interface: str) -> int:
            return 2

    step = PruneRoutes("eth0", (IPv4Network("10.96.0.10/32"),))
    assert [d.line() for d in explain(step, Context())] == [  # type: ignore[arg-type]
        "differs: ip route del <each route dev eth0 proto 245 but 10.96.0.10/32> (did not hold, then changed "
        "while it was read again)"]


# ---------------------------------------------------------------- high availability: the role compared with

HA_ENV = {**ENV, "EGRESS_ROUTER_MODE": "legacy", "EGRESS_HA_PEERS": "198.51.100.10 198.51.100.11"}


def ha_settings(state_dir: Path):  # type: ignore[no-untyped-def]
    from egress_router.core.config import load

    settings = load({**HA_ENV, "EGRESS_HA_STATE_DIR": str(state_dir)}).ha
    assert settings is not None
    return settings


def test_the_role_is_what_the_running_router_wrote_any_state_but_active_a_standbys_part(tmp_path: Path) -> None:
    from egress_router.readiness import write_state
    from egress_router.verify import replica_role

    settings = ha_settings(tmp_path)
    write_state(tmp_path, "active")  # this process is the router that wrote it: it runs
    assert replica_role(settings) == ("active", "active replica: it holds EGRESS_SOURCE")
    write_state(tmp_path, "standby")
    assert replica_role(settings) == ("standby", "standby replica: EGRESS_SOURCE is held by another replica")
    write_state(tmp_path, "starting")  # keepalived has not reported yet: it holds what a standby holds
    assert replica_role(settings) == ("standby", "standby replica: EGRESS_SOURCE is held by another replica (the "
                                      "router says starting)")
    assert replica_role(settings, "active") == ("active", "active replica: it holds EGRESS_SOURCE (--role active, "
                                                "not read from a running router)")


@pytest.mark.parametrize(("content", "why"), [
    (None, "no state in {path}"),
    ("stopped {pid}\n", "the router that wrote {path} stopped"),
    ("active 999999999\n", "the router that wrote {path} (pid 999999999) is gone"),
    ("active ../self\n", "no state in {path}"),  # not a pid the router writes
])
def test_no_running_router_is_an_error_unless_a_role_is_given(tmp_path: Path, content: str | None, why: str) -> None:
    from egress_router.core.errors import SetupError
    from egress_router.verify import replica_role

    path = tmp_path / "ha-state"
    if content is not None:
        path.write_text(content.format(pid=os.getpid()), encoding="ascii")
    with pytest.raises(SetupError) as caught:
        replica_role(ha_settings(tmp_path))
    assert str(caught.value) == (f"no high-availability router runs here ({why.format(path=path)}; "
                                 "EGRESS_HA_STATE_DIR): which part of the plan this replica holds is its role; give "
                                 "--role active or --role standby to compare with that one")
    assert replica_role(ha_settings(tmp_path), "standby")[0] == "standby"


def test_verify_without_a_running_replica_exits_2_before_reading_the_namespace(tmp_path: Path) -> None:
    env = {**HA_ENV, "EGRESS_HA_STATE_DIR": str(tmp_path)}
    report = verify(env)
    assert (report.exit_code, report.role) == (2, None)
    assert report.error is not None and report.error.startswith("no high-availability router runs here (no state in")
    result = CliRunner().invoke(main, ["verify", "--output", "json"], env=env)
    assert result.exit_code == 2 and json.loads(result.stdout)["error"] == report.error
    assert "role" not in json.loads(result.stdout)


def test_a_role_given_without_high_availability_is_an_error() -> None:
    assert verify(ENV, "standby").error == "--role standby is for a high-availability replica: EGRESS_HA_PEERS is unset"
    result = CliRunner().invoke(main, ["verify", "--role", "standby"], env=ENV)
    assert (result.exit_code, result.stderr) == (
        2, "error: --role standby is for a high-availability replica: EGRESS_HA_PEERS is unset\n")
    result = CliRunner().invoke(main, ["verify", "--role", "leader"], env=HA_ENV)
    assert result.exit_code == 2 and "'leader' is not one of 'active', 'standby'" in result.stderr
    assert "--role [active|standby]" in CliRunner().invoke(main, ["verify", "--help"]).output


def test_the_report_says_the_role_first_in_text_and_as_keys_in_json() -> None:
    report = Report((Difference("extra", "ip address del 192.0.2.99/24 dev macvlan0"),), summary="not converged",
                    role="standby", role_line="standby replica: EGRESS_SOURCE is held by another replica")
    assert report.lines() == ["standby replica: EGRESS_SOURCE is held by another replica",
                              "extra: ip address del 192.0.2.99/24 dev macvlan0", "not converged"]
    document = json.loads(report.json())
    assert (document["role"], document["role_line"], document["converged"]) == (
        "standby", "standby replica: EGRESS_SOURCE is held by another replica", False)
    assert set(json.loads(Report(summary="converged").json())) == {"converged", "differences", "error", "summary"}


@pytest.mark.parametrize(("lifetime", "valid", "found"), [
    (1, 1, None), (1, 0, None),  # renewed 4 times a second: the kernel counts down from 1
    (1, None, "valid forever"),  # added without a lifetime: a crashed replica's address would never lapse
    (1, 3600, "valid for 3600 s"),
    (None, None, None),  # no lifetime planned (not high availability): any lifetime will do
])
def test_an_active_replicas_address_without_its_lifetime_differs(lifetime: int | None, valid: int | None,
                                                                 found: str | None) -> None:
    from ipaddress import ip_interface

    from egress_router.core.steps import Address
    from egress_router.verify import lifetime_difference

    step = Address("macvlan0", ip_interface("192.0.2.99/24"), lifetime=lifetime)
    difference = lifetime_difference(step, valid)
    if found is None:
        assert difference is None
    else:
        assert difference is not None and difference.line() == (
            f"differs: ip address add 192.0.2.99/24 dev macvlan0 valid_lft 1 preferred_lft 1 (found 192.0.2.99/24 "
            f"{found}: a replica that dies would keep answering for it)")


def test_a_reserved_address_on_a_standby_is_extra_whatever_its_prefix() -> None:
    from ipaddress import ip_address, ip_interface

    from egress_router.core.plan import dual_plan
    from egress_router.verify import standby_extras, summary

    plan = dual_plan("macvlan0", "eth0", [(ip_interface("192.0.2.99/24"), ip_address("192.0.2.1")),
                                          (ip_interface("2001:db8:2::99/64"), ip_address("fe80::1"))], None)
    present = [("192.0.2.5", 24), ("192.0.2.99", 32), ("fe80::1", 64), ("2001:db8:2::99", 64)]
    assert [d.line() for d in standby_extras(plan, present)] == [
        "extra: ip address del 192.0.2.99/32 dev macvlan0 (a standby holds no reserved address: the active replica "
        "does)",
        "extra: ip address del 2001:db8:2::99/64 dev macvlan0 (a standby holds no reserved address: the active "
        "replica does)"]
    assert standby_extras(plan, [("192.0.2.5", 24)]) == []
    assert summary("legacy", plan, 0, 2).startswith("not converged: 0 of ")
    assert ", and 2 reserved address(es) held, which a standby must not (legacy mode: " in summary("legacy", plan, 0, 2)


def test_the_plugin_passes_the_role_and_asserts_it(tmp_path: Path) -> None:
    import testinfra

    from egress_router.testinfra_plugin import assert_converged, assert_role

    fake = tmp_path / "egress-router"
    fake.write_text(f"""#!{sys.executable}
import json, sys
role = sys.argv[sys.argv.index("--role") + 1] if "--role" in sys.argv else "standby"
print(json.dumps({{"converged": True, "differences": [], "error": None, "summary": " ".join(sys.argv[1:]),
                  "role": role, "role_line": role}}))
""")
    fake.chmod(0o755)
    host = testinfra.get_host("local://")
    assert verify_command(role="active") == "egress-router verify --output json --role active"
    state = assert_converged(host, {}, command=str(fake), role="active")
    assert (state.role, state.summary) == ("active", "verify --output json --role active")
    assert router_state(host, {}, command=str(fake)).role == "standby"
    assert assert_role(host, "standby", {}, command=str(fake)).converged
    with pytest.raises(AssertionError) as failed:
        assert_role(host, "active", {}, command=str(fake))
    assert str(failed.value) == "egress router on local is the standby replica, not the active one"
    differs = RouterState("h", False, ({"kind": "extra", "step": "ip address del x", "detail": ""},), None,
                          "not converged", 1, "standby")
    assert differs.failure().splitlines() == ["egress router on h, the standby replica, is not as configured: not "
                                              "converged", "  extra: ip address del x"]

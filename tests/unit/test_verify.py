"""verify's pure parts: NAT differences from a parsed iptables-save, the report, the CLI's exit codes and JSON."""

from __future__ import annotations

import json
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

"""core/nat.py: rule specifications, iptables-save parsing and iptables-restore payloads."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface

import pytest

from egress_router.core.config import load
from egress_router.core.nat import (
    DNAT_CHAIN,
    JUMPS,
    SNAT_CHAIN,
    NatRules,
    NatState,
    desired_chains,
    dnat_specs,
    failed_line_hint,
    legacy_lines,
    parse_save,
    render,
    restore_payload,
)
from egress_router.core.plan import build_plan, network_plan
from egress_router.core.redirect import Destinations, PortRule, parse_destinations

LEGACY_ENV = {
    "EGRESS_ROUTER_MODE": "unit-test",
    "EGRESS_SOURCE": "1.2.3.4",
    "EGRESS_GATEWAY": "1.1.1.1",
    "EGRESS_DESTINATION": "80 tcp 10.4.5.6\n8080 tcp 10.7.8.9 80\n10.1.2.3",
}
LEGACY_OUTPUT = [
    "-A PREROUTING -i eth0 -p tcp --dport 80 -j DNAT --to-destination 10.4.5.6",
    "-A PREROUTING -i eth0 -p tcp --dport 8080 -j DNAT --to-destination 10.7.8.9:80",
    "-A PREROUTING -i eth0 -j DNAT --to-destination 10.1.2.3",
    "-A POSTROUTING -j SNAT --to-source 1.2.3.4",
]

DESTS = parse_destinations("80 tcp 10.4.5.6\n8080 tcp 10.7.8.9 80\n53 udp 10.0.0.53\n9 SCTP 10.0.0.9 19\n10.1.2.3")


def make_plan(destinations: Destinations = DESTS, *, interface: str = "macvlan0", pod: str = "eth0",
              source: str = "192.0.2.99/24") -> NatRules:
    """The NAT step of the plan for these settings."""
    nat = network_plan(interface, pod, IPv4Interface(source), IPv4Address("192.0.2.1"), destinations).nat
    assert nat is not None
    return nat


PLAN = make_plan()
WANTED_DNAT = [
    "-i eth0 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.4.5.6",
    "-i eth0 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.7.8.9:80",
    "-i eth0 -p udp -m udp --dport 53 -j DNAT --to-destination 10.0.0.53",
    "-i eth0 -p sctp -m sctp --dport 9 -j DNAT --to-destination 10.0.0.9:19",
    "-i eth0 -j DNAT --to-destination 10.1.2.3",
]
WANTED_SNAT = ["-o macvlan0 -j SNAT --to-source 192.0.2.99"]


# ---------------------------------------------------------------- rule specifications


def test_dnat_specs_normal_spelling() -> None:
    assert dnat_specs(DESTS, "eth0") == WANTED_DNAT


def test_dnat_specs_legacy_spelling() -> None:
    assert dnat_specs(DESTS, "eth0", legacy=True) == [
        "-i eth0 -p tcp --dport 80 -j DNAT --to-destination 10.4.5.6",
        "-i eth0 -p tcp --dport 8080 -j DNAT --to-destination 10.7.8.9:80",
        "-i eth0 -p udp --dport 53 -j DNAT --to-destination 10.0.0.53",
        "-i eth0 -p sctp --dport 9 -j DNAT --to-destination 10.0.0.9:19",
        "-i eth0 -j DNAT --to-destination 10.1.2.3",
    ]


@pytest.mark.parametrize(
    ("destinations", "specs"),
    [
        (Destinations((), IPv4Address("10.0.0.1")), ["-i veth+ -j DNAT --to-destination 10.0.0.1"]),
        (Destinations((PortRule(22, "tcp", IPv4Address("10.0.0.2")),)),
         ["-i veth+ -p tcp -m tcp --dport 22 -j DNAT --to-destination 10.0.0.2"]),
        (Destinations((PortRule(22, "tcp", IPv4Address("10.0.0.2"), 22),)),
         ["-i veth+ -p tcp -m tcp --dport 22 -j DNAT --to-destination 10.0.0.2:22"]),
    ],
)
def test_dnat_specs_pod_interface_and_shapes(destinations: Destinations, specs: list[str]) -> None:
    assert dnat_specs(destinations, "veth+") == specs


def test_fallback_is_always_last() -> None:
    specs = dnat_specs(DESTS, "eth0")
    assert specs[-1] == "-i eth0 -j DNAT --to-destination 10.1.2.3"
    assert all("--dport" in spec for spec in specs[:-1])


def test_legacy_lines_match_the_legacy_image_byte_for_byte() -> None:
    lines = legacy_lines(load(LEGACY_ENV))
    assert lines == LEGACY_OUTPUT
    assert "\n".join(lines) + "\n" == (
        "-A PREROUTING -i eth0 -p tcp --dport 80 -j DNAT --to-destination 10.4.5.6\n"
        "-A PREROUTING -i eth0 -p tcp --dport 8080 -j DNAT --to-destination 10.7.8.9:80\n"
        "-A PREROUTING -i eth0 -j DNAT --to-destination 10.1.2.3\n"
        "-A POSTROUTING -j SNAT --to-source 1.2.3.4\n"
    )


def test_legacy_lines_use_source_ip_without_prefix_and_pod_interface() -> None:
    config = load({**LEGACY_ENV, "EGRESS_SOURCE": "1.2.3.4/24", "EGRESS_GATEWAY": "1.2.3.1",
                   "EGRESS_POD_INTERFACE": "net0", "EGRESS_DESTINATION": "10.1.2.3"})
    assert legacy_lines(config) == [
        "-A PREROUTING -i net0 -j DNAT --to-destination 10.1.2.3",
        "-A POSTROUTING -j SNAT --to-source 1.2.3.4",
    ]


def test_desired_chains() -> None:
    assert desired_chains(PLAN) == {DNAT_CHAIN: WANTED_DNAT, SNAT_CHAIN: WANTED_SNAT}


def test_desired_chains_from_a_built_plan() -> None:
    config = load({**LEGACY_ENV, "EGRESS_ROUTER_MODE": "init", "EGRESS_POD_INTERFACE": "veth+"})
    nat = build_plan(config, "net1").nat
    assert nat is not None
    chains = desired_chains(nat)
    assert chains[SNAT_CHAIN] == ["-o net1 -j SNAT --to-source 1.2.3.4"]
    assert chains[DNAT_CHAIN][0] == "-i veth+ -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.4.5.6"


def test_jumps_table() -> None:
    assert JUMPS == {"PREROUTING": "EGRESS-ROUTER-DNAT", "POSTROUTING": "EGRESS-ROUTER-SNAT"}


# ---------------------------------------------------------------- iptables-save parsing

REALISTIC_SAVE = """\
# Generated by iptables-save v1.8.9 (nf_tables) on Mon Jan  1 00:00:00 2024
*filter
:INPUT ACCEPT [1234:567890]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [99:8888]
:KUBE-FIREWALL - [0:0]
-A INPUT -j KUBE-FIREWALL
-A PREROUTING -j SHOULD-NOT-APPEAR
-A KUBE-FIREWALL -m mark --mark 0x8000/0x8000 -j DROP
COMMIT
# Completed on Mon Jan  1 00:00:00 2024
# Generated by iptables-save v1.8.9 (nf_tables) on Mon Jan  1 00:00:00 2024
*nat
:PREROUTING ACCEPT [12:720]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [3:180]
:POSTROUTING ACCEPT [3:180]
:EGRESS-ROUTER-DNAT - [0:0]
:EGRESS-ROUTER-SNAT - [0:0]
:KUBE-SERVICES - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A PREROUTING -j EGRESS-ROUTER-DNAT
-A POSTROUTING -j EGRESS-ROUTER-SNAT
-A EGRESS-ROUTER-DNAT -i eth0 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.4.5.6
-A EGRESS-ROUTER-SNAT -o macvlan0 -j SNAT --to-source 192.0.2.99
-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m tcp --dport 443 -j KUBE-SVC-NPX46M4PTMTKRN6Y
COMMIT
# Completed on Mon Jan  1 00:00:00 2024
*mangle
:PREROUTING ACCEPT [0:0]
-A PREROUTING -j MARK --set-xmark 0x1/0xffffffff
COMMIT
"""


def test_parse_save_realistic() -> None:
    state = parse_save(REALISTIC_SAVE)
    assert state.chains == {
        "PREROUTING": ['-m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
                       "-j EGRESS-ROUTER-DNAT"],
        "INPUT": [],
        "OUTPUT": [],
        "POSTROUTING": ["-j EGRESS-ROUTER-SNAT"],
        "EGRESS-ROUTER-DNAT": ["-i eth0 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.4.5.6"],
        "EGRESS-ROUTER-SNAT": ["-o macvlan0 -j SNAT --to-source 192.0.2.99"],
        "KUBE-SERVICES": ["-d 10.96.0.1/32 -p tcp -m tcp --dport 443 -j KUBE-SVC-NPX46M4PTMTKRN6Y"],
    }
    assert list(state.chains) == ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING", "EGRESS-ROUTER-DNAT",
                                  "EGRESS-ROUTER-SNAT", "KUBE-SERVICES"]


def test_parse_save_ours_and_jump_count() -> None:
    state = parse_save(REALISTIC_SAVE)
    assert state.ours() == {
        DNAT_CHAIN: ["-i eth0 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.4.5.6"],
        SNAT_CHAIN: ["-o macvlan0 -j SNAT --to-source 192.0.2.99"],
    }
    assert state.jump_count("PREROUTING", DNAT_CHAIN) == 1
    assert state.jump_count("POSTROUTING", SNAT_CHAIN) == 1
    assert state.jump_count("PREROUTING", SNAT_CHAIN) == 0
    assert state.jump_count("NO-SUCH-CHAIN", DNAT_CHAIN) == 0


@pytest.mark.parametrize("text", ["", "# nothing\n", "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j DROP\nCOMMIT\n"])
def test_parse_save_without_nat_table(text: str) -> None:
    assert parse_save(text) == NatState()


def test_parse_save_rule_before_declaration_and_empty_chain() -> None:
    state = parse_save("*nat\n-A LATE -j RETURN\n:EMPTY - [0:0]\nCOMMIT\n")
    assert state.chains == {"LATE": ["-j RETURN"], "EMPTY": []}


def test_parse_save_handles_crlf() -> None:
    state = parse_save("*nat\r\n:PREROUTING ACCEPT [0:0]\r\n-A PREROUTING -j EGRESS-ROUTER-DNAT\r\nCOMMIT\r\n")
    assert state.jump_count("PREROUTING", DNAT_CHAIN) == 1


def test_jump_count_ignores_conditional_jumps() -> None:
    state = NatState({"PREROUTING": ["-i eth0 -j EGRESS-ROUTER-DNAT", "-j EGRESS-ROUTER-DNAT"]})
    assert state.jump_count("PREROUTING", DNAT_CHAIN) == 1


# ---------------------------------------------------------------- restore payloads


def save_text(chains: dict[str, list[str]], *, builtins: dict[str, list[str]] | None = None,
              jumps: dict[str, int] | None = None) -> str:
    """A fake `iptables-save -t nat` with `chains`, built-in chains with `builtins` and our jumps."""
    jumps = {"PREROUTING": 1, "POSTROUTING": 1} if jumps is None else jumps
    builtin_rules = {name: list(rules) for name, rules in (builtins or {}).items()}
    for builtin, target in JUMPS.items():
        builtin_rules.setdefault(builtin, []).extend([f"-j {target}"] * jumps.get(builtin, 0))
    lines = ["# Generated by iptables-save", "*nat"]
    lines += [f":{name} ACCEPT [0:0]" for name in ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")]
    lines += [f":{name} - [0:0]" for name in chains]
    for name in ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"):
        lines += [f"-A {name} {rule}" for rule in builtin_rules.get(name, [])]
    for name, rules in chains.items():
        lines += [f"-A {name} {rule}" for rule in rules]
    lines += ["COMMIT", "# Completed"]
    return "\n".join(lines) + "\n"


OTHERS = {"KUBE-SERVICES": ["-j KUBE-NODEPORTS"], "KUBE-NODEPORTS": [], "CNI-HOSTPORT-DNAT": ["-j RETURN"]}
OTHER_BUILTINS = {"PREROUTING": ["-j KUBE-SERVICES"], "OUTPUT": ["-j KUBE-SERVICES"],
                  "POSTROUTING": ["-j CNI-HOSTPORT-MASQ"]}

FRESH_PAYLOAD = "\n".join([
    "*nat",
    ":EGRESS-ROUTER-DNAT - [0:0]",
    ":EGRESS-ROUTER-SNAT - [0:0]",
    *[f"-A EGRESS-ROUTER-DNAT {spec}" for spec in WANTED_DNAT],
    *[f"-A EGRESS-ROUTER-SNAT {spec}" for spec in WANTED_SNAT],
    "-A PREROUTING -j EGRESS-ROUTER-DNAT",
    "-A POSTROUTING -j EGRESS-ROUTER-SNAT",
    "COMMIT",
]) + "\n"


def converged(**extra: list[str]) -> dict[str, list[str]]:
    return {**OTHERS, DNAT_CHAIN: list(WANTED_DNAT), SNAT_CHAIN: list(WANTED_SNAT), **extra}


def test_fresh_state_payload() -> None:
    assert restore_payload(PLAN, NatState()) == FRESH_PAYLOAD


def test_fresh_state_with_other_owners_is_the_same_payload() -> None:
    state = parse_save(save_text(OTHERS, builtins=OTHER_BUILTINS, jumps={}))
    assert restore_payload(PLAN, state) == FRESH_PAYLOAD


def test_render_is_the_fresh_payload() -> None:
    assert render(PLAN) == FRESH_PAYLOAD
    assert render(PLAN).endswith("COMMIT\n")


def test_converged_state_needs_nothing() -> None:
    state = parse_save(save_text(converged(), builtins=OTHER_BUILTINS))
    assert restore_payload(PLAN, state) is None


@pytest.mark.parametrize(("missing", "present"), [("PREROUTING", "POSTROUTING"), ("POSTROUTING", "PREROUTING")])
def test_missing_one_jump_adds_only_that_one(missing: str, present: str) -> None:
    state = parse_save(save_text(converged(), builtins=OTHER_BUILTINS, jumps={present: 1}))
    payload = restore_payload(PLAN, state)
    assert payload is not None
    lines = payload.splitlines()
    assert f"-A {missing} -j {JUMPS[missing]}" in lines
    assert not any(line.startswith(f"-A {present} ") or line.startswith(f"-D {present} ") for line in lines)
    assert not any(line.startswith("-D ") for line in lines)
    assert lines[0] == "*nat" and lines[-1] == "COMMIT"


@pytest.mark.parametrize("builtin", ["PREROUTING", "POSTROUTING"])
def test_triplicated_jump_deletes_two(builtin: str) -> None:
    state = parse_save(save_text(converged(), builtins=OTHER_BUILTINS, jumps={"PREROUTING": 1, "POSTROUTING": 1,
                                                                             builtin: 3}))
    payload = restore_payload(PLAN, state)
    assert payload is not None
    lines = payload.splitlines()
    assert lines.count(f"-D {builtin} -j {JUMPS[builtin]}") == 2
    assert [line for line in lines if line.startswith(("-D ", "-A PREROUTING", "-A POSTROUTING"))] == \
        [f"-D {builtin} -j {JUMPS[builtin]}"] * 2


def test_both_jumps_duplicated() -> None:
    state = parse_save(save_text(converged(), jumps={"PREROUTING": 2, "POSTROUTING": 4}))
    payload = restore_payload(PLAN, state)
    assert payload is not None
    lines = payload.splitlines()
    assert lines.count("-D PREROUTING -j EGRESS-ROUTER-DNAT") == 1
    assert lines.count("-D POSTROUTING -j EGRESS-ROUTER-SNAT") == 3


@pytest.mark.parametrize(
    "ours",
    [
        {DNAT_CHAIN: WANTED_DNAT[:-1], SNAT_CHAIN: WANTED_SNAT},  # a rule missing
        {DNAT_CHAIN: WANTED_DNAT + WANTED_DNAT[:1], SNAT_CHAIN: WANTED_SNAT},  # an extra rule
        {DNAT_CHAIN: WANTED_DNAT[::-1], SNAT_CHAIN: WANTED_SNAT},  # wrong order
        {DNAT_CHAIN: WANTED_DNAT, SNAT_CHAIN: ["-o macvlan0 -j SNAT --to-source 192.0.2.100"]},  # old source
        {DNAT_CHAIN: WANTED_DNAT, SNAT_CHAIN: []},  # emptied chain
        {DNAT_CHAIN: WANTED_DNAT},  # chain gone
        {SNAT_CHAIN: WANTED_SNAT},
    ],
    ids=["missing-rule", "extra-rule", "order", "stale-snat", "empty-chain", "no-snat-chain", "no-dnat-chain"],
)
def test_rules_differing_rewrites_our_chains_whole(ours: dict[str, list[str]]) -> None:
    state = parse_save(save_text({**OTHERS, **ours}, builtins=OTHER_BUILTINS))
    payload = restore_payload(PLAN, state)
    assert payload is not None
    lines = payload.splitlines()
    # declaring both chains flushes them; all wanted rules follow, and jumps are left alone (they are fine)
    assert lines == FRESH_PAYLOAD.splitlines()[:-3] + ["COMMIT"]


def test_other_owners_are_never_mentioned() -> None:
    for state in [
        parse_save(save_text(OTHERS, builtins=OTHER_BUILTINS, jumps={})),
        parse_save(save_text(converged(), builtins=OTHER_BUILTINS, jumps={"PREROUTING": 3, "POSTROUTING": 0})),
        parse_save(REALISTIC_SAVE),
    ]:
        payload = restore_payload(PLAN, state)
        assert payload is not None
        for name in ("KUBE-SERVICES", "KUBE-NODEPORTS", "CNI-HOSTPORT", "INPUT", "OUTPUT"):
            assert name not in payload
        for line in payload.splitlines():
            assert line in ("*nat", "COMMIT") or DNAT_CHAIN in line or SNAT_CHAIN in line


def test_realistic_state_already_holds_its_plan() -> None:
    payload = restore_payload(make_plan(Destinations((PortRule(80, "tcp", IPv4Address("10.4.5.6")),)),
                                        source="192.0.2.99"), parse_save(REALISTIC_SAVE))
    assert payload is None  # REALISTIC_SAVE already holds exactly this plan


def test_payload_is_iptables_restore_input() -> None:
    payload = render(make_plan(interface="net1", pod="veth+"))
    assert payload.endswith("\n") and not payload.endswith("\n\n")
    lines = payload.splitlines()
    assert lines[0] == "*nat"
    assert lines[-1] == "COMMIT"
    assert ":EGRESS-ROUTER-DNAT - [0:0]" in lines and ":EGRESS-ROUTER-SNAT - [0:0]" in lines
    # declarations come before the rules that use the chains
    assert lines.index(":EGRESS-ROUTER-DNAT - [0:0]") < lines.index("-A PREROUTING -j EGRESS-ROUTER-DNAT")
    assert "-A EGRESS-ROUTER-SNAT -o net1 -j SNAT --to-source 192.0.2.99" in lines
    assert all(" -i veth+ " in line for line in lines if line.startswith("-A EGRESS-ROUTER-DNAT"))


def test_plan_without_destinations_has_no_nat_step() -> None:
    plan = network_plan("macvlan0", "eth0", IPv4Interface("192.0.2.99/32"), IPv4Address("192.0.2.1"), None)
    assert plan.nat is None
    assert not any(isinstance(step, NatRules) for step in plan.steps)


# ---------------------------------------------------------------- failed_line_hint

PAYLOAD = "*nat\n:EGRESS-ROUTER-DNAT - [0:0]\n-A EGRESS-ROUTER-DNAT -j BOGUS\nCOMMIT\n"


@pytest.mark.parametrize(
    ("message", "hint"),
    [
        ("iptables-restore --noflush failed: iptables-restore: line 3 failed",
         " (the rule was '-A EGRESS-ROUTER-DNAT -j BOGUS')"),
        ("line 1 failed", " (the rule was '*nat')"),
        ("line 4 failed", " (the rule was 'COMMIT')"),
        ("line 5 failed", ""),
        ("line 0 failed", ""),
        ("line 99 failed", ""),
        ("iptables-restore: unable to initialize table 'nat'", ""),
        ("", ""),
    ],
)
def test_failed_line_hint(message: str, hint: str) -> None:
    assert failed_line_hint(message, PAYLOAD) == hint

"""Properties: the parsers fail only with ConfigError, formatting round-trips, and NAT payloads converge."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from hypothesis import given, settings
from hypothesis import strategies as st

from egress_router.core.config import load
from egress_router.core.errors import ConfigError
from egress_router.core.nat import (
    DNAT_CHAIN,
    JUMPS,
    SNAT_CHAIN,
    NatRules,
    NatState,
    desired_chains,
    parse_save,
    render,
    restore_payload,
)
from egress_router.core.plan import network_plan
from egress_router.core.redirect import Destinations, PortRule, format_destinations, parse_destinations

MODEST = settings(max_examples=200, deadline=None)

# ---------------------------------------------------------------- strategies

GRAMMAR_ALPHABET = st.sampled_from(
    list("0123456789") + [".", " ", "\t", "#", "\n", "\r", "/", "-", "tcp", "udp", "sctp", "TCP", "10.", "65535",
                          "255", "127.", "224."]
)
grammarish = st.lists(GRAMMAR_ALPHABET, max_size=60).map("".join)
any_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=80)  # control characters and unicode included
values = st.one_of(any_text, grammarish)

_UNUSABLE = [IPv4Network("0.0.0.0/32"), IPv4Network("127.0.0.0/8"), IPv4Network("224.0.0.0/4"),
             IPv4Network("255.255.255.255/32")]


def usable(address: IPv4Address) -> bool:
    return not any(address in net for net in _UNUSABLE)


unicast = st.integers(0, 2**32 - 1).map(IPv4Address).filter(usable)
ports = st.integers(1, 65535)
protos = st.sampled_from(["tcp", "udp", "sctp"])


@st.composite
def destinations(draw: st.DrawFn) -> Destinations:
    raw = draw(st.lists(st.tuples(ports, protos, unicast, st.none() | ports), unique_by=lambda r: (r[0], r[1]),
                        max_size=12))
    fallback = draw(st.none() | unicast) if raw else draw(unicast)
    return Destinations(tuple(PortRule(p, proto, ip, remote) for p, proto, ip, remote in raw), fallback)


# ---------------------------------------------------------------- (a) only ConfigError escapes


def check_error(err: ConfigError) -> None:
    message = str(err)
    assert len(message.splitlines()) == 1, message
    assert message.startswith(err.variable)


@MODEST
@given(values)
def test_parse_destinations_raises_only_config_error(text: str) -> None:
    try:
        parsed = parse_destinations(text)
    except ConfigError as err:
        assert err.variable == "EGRESS_DESTINATION"
        if err.line is not None:
            assert 1 <= err.line <= text.count("\n") + 1
            assert err.text == text.split("\n")[err.line - 1].strip()
        check_error(err)
    else:
        assert len(parsed) >= 1
        assert parse_destinations(format_destinations(parsed)) == parsed


@MODEST
@given(
    mode=st.none() | st.sampled_from(["init", "legacy", "unit-test", "http-proxy", "dns-proxy"]) | values,
    source=st.none() | st.sampled_from(["192.0.2.99", "192.0.2.99/24", "10.0.0.0/8"]) | values,
    gateway=st.none() | st.sampled_from(["192.0.2.1", "192.0.2.99", "192.0.2.255"]) | values,
    destination=st.none() | st.sampled_from(["80 tcp 10.0.0.1", "10.0.0.1"]) | values,
    interface=st.none() | st.sampled_from(["net1", "eth0"]) | values,
    pod_interface=st.none() | st.sampled_from(["eth0", "veth+"]) | values,
)
def test_load_raises_only_config_error(mode: str | None, source: str | None, gateway: str | None,
                                       destination: str | None, interface: str | None,
                                       pod_interface: str | None) -> None:
    env = {name: value for name, value in {
        "EGRESS_ROUTER_MODE": mode, "EGRESS_SOURCE": source, "EGRESS_GATEWAY": gateway,
        "EGRESS_DESTINATION": destination, "EGRESS_INTERFACE": interface, "EGRESS_POD_INTERFACE": pod_interface,
    }.items() if value is not None}
    try:
        config = load(env)
    except ConfigError as err:
        check_error(err)
    else:
        assert config.gateway != config.source.ip
        assert (config.destinations is not None) == config.configures_nat


# ---------------------------------------------------------------- (b) round trip


@MODEST
@given(destinations())
def test_format_then_parse_is_identity(dests: Destinations) -> None:
    text = format_destinations(dests)
    assert parse_destinations(text) == dests
    assert format_destinations(parse_destinations(text)) == text


blanks = st.text(alphabet=" \t", max_size=3)
separators = st.text(alphabet=" \t", min_size=1, max_size=3)
comments = st.none() | st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\n"), max_size=15)


@st.composite
def messy_text(draw: st.DrawFn, dests: Destinations) -> tuple[str, list[int]]:
    """`dests` written with random whitespace, comments, protocol case and line endings; also the rule lines."""
    ending = draw(st.sampled_from(["\n", "\r\n"]))
    lines: list[str] = []
    rule_lines: list[int] = []

    def filler() -> None:
        for _ in range(draw(st.integers(0, 2))):
            comment = draw(comments)
            lines.append(draw(blanks) + ("" if comment is None else "#" + comment))

    def emit(fields: list[str]) -> None:
        filler()
        body = draw(blanks) + fields[0]
        for value in fields[1:]:
            body += draw(separators) + value
        comment = draw(comments)
        body += draw(blanks) + ("" if comment is None else "#" + comment)
        lines.append(body)

    for rule in dests.rules:
        proto = "".join(c.upper() if draw(st.booleans()) else c for c in rule.proto)
        fields = [str(rule.port), proto, str(rule.ip)] + ([] if rule.remote_port is None else [str(rule.remote_port)])
        emit(fields)
        rule_lines.append(len(lines))
    if dests.fallback is not None:
        emit([str(dests.fallback)])
    filler()
    return ending.join(lines) + draw(st.sampled_from(["", ending])), rule_lines


@MODEST
@given(st.data())
def test_messy_layout_parses_equal(data: st.DataObject) -> None:
    dests = data.draw(destinations())
    text, rule_lines = data.draw(messy_text(dests))
    parsed = parse_destinations(text)
    assert parsed == dests
    assert [rule.line for rule in parsed.rules] == rule_lines


# ---------------------------------------------------------------- (c) NAT payloads converge

interfaces = st.sampled_from(["macvlan0", "net1", "eth1"])
pod_interfaces = st.sampled_from(["eth0", "veth+", "cali+"])


@st.composite
def plans(draw: st.DrawFn) -> NatRules:
    """The NAT step of a drawn plan."""
    address = draw(unicast)
    nat = network_plan(draw(interfaces), draw(pod_interfaces), IPv4Interface(f"{address}/{draw(st.integers(24, 32))}"),
                       draw(unicast), draw(destinations())).nat
    assert nat is not None
    return nat


OTHER_CHAINS = {"KUBE-SERVICES": ["-j KUBE-NODEPORTS"], "KUBE-NODEPORTS": [],
                "CNI-DN-1234": ["-p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.244.0.5:80"]}


def save_of(chains: dict[str, list[str]], *, with_filter: bool) -> str:
    """A fake `iptables-save` (filter table optional) holding `chains` in its nat table."""
    lines = ["# Generated by iptables-save v1.8.9 (nf_tables)"]
    if with_filter:
        lines += ["*filter", ":INPUT ACCEPT [0:0]", "-A INPUT -j DROP", "COMMIT"]
    lines.append("*nat")
    builtins = ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")
    lines += [f":{name} ACCEPT [{len(name)}:{len(name) * 60}]" for name in builtins]
    lines += [f":{name} - [0:0]" for name in chains if name not in builtins]
    for name, rules in chains.items():
        lines += [f"-A {name} {rule}" for rule in rules]
    lines += ["COMMIT", "# Completed"]
    return "\n".join(lines) + "\n"


def after_state(plan: NatRules, *, others: bool) -> dict[str, list[str]]:
    chains: dict[str, list[str]] = {"PREROUTING": [], "POSTROUTING": []}
    if others:
        chains["PREROUTING"].append("-m comment --comment portals -j KUBE-SERVICES")
        chains["POSTROUTING"].append("-j MASQUERADE")
        chains.update(OTHER_CHAINS)
    for builtin, target in JUMPS.items():
        chains[builtin].append(f"-j {target}")
    chains.update(desired_chains(plan))
    return chains


@MODEST
@given(plans(), st.booleans(), st.booleans())
def test_converged_save_needs_no_payload(plan: NatRules, others: bool, with_filter: bool) -> None:
    state = parse_save(save_of(after_state(plan, others=others), with_filter=with_filter))
    assert restore_payload(plan, state) is None


def apply_restore(chains: dict[str, list[str]], payload: str) -> dict[str, list[str]]:
    """What `iptables-restore --noflush` does to the nat table with `payload` (declaring a chain flushes it)."""
    result = {name: list(rules) for name, rules in chains.items()}
    lines = payload.splitlines()
    assert lines[0] == "*nat" and lines[-1] == "COMMIT"
    for line in lines[1:-1]:
        if line.startswith(":"):
            result[line[1:].split(" ", 1)[0]] = []
        elif line.startswith(("-A ", "-D ")):
            chain, _, spec = line[3:].partition(" ")
            assert chain in result, f"{line!r}: no chain {chain}"
            if line.startswith("-A "):
                assert not spec.startswith("-j ") or spec[3:] in result or spec[3:] in ("DNAT", "SNAT"), line
                result[chain].append(spec)
            else:
                assert spec in result[chain], f"{line!r}: no such rule to delete"
                result[chain].remove(spec)
        else:
            raise AssertionError(f"unexpected payload line {line!r}")
    return result


stale_rules = st.lists(st.sampled_from(["-j RETURN", "-i eth0 -j DNAT --to-destination 10.0.0.1",
                                        "-o macvlan0 -j SNAT --to-source 10.0.0.2"]), max_size=3)


@MODEST
@given(plans(), st.integers(0, 3), st.integers(0, 3), st.none() | stale_rules, st.none() | stale_rules,
       st.booleans())
def test_payload_converges_any_starting_state(plan: NatRules, pre_jumps: int, post_jumps: int,
                                              dnat: list[str] | None, snat: list[str] | None, others: bool) -> None:
    """From any mix of missing/duplicated jumps and stale/missing chains, one payload reaches the plan."""
    chains: dict[str, list[str]] = {"PREROUTING": [], "INPUT": [], "OUTPUT": [], "POSTROUTING": []}
    if others:
        chains["PREROUTING"].append("-j KUBE-SERVICES")
        chains["POSTROUTING"].append("-j MASQUERADE")
        chains.update({name: list(rules) for name, rules in OTHER_CHAINS.items()})
    chains["PREROUTING"] += [f"-j {DNAT_CHAIN}"] * pre_jumps
    chains["POSTROUTING"] += [f"-j {SNAT_CHAIN}"] * post_jumps
    if dnat is not None:
        chains[DNAT_CHAIN] = list(dnat)
    if snat is not None:
        chains[SNAT_CHAIN] = list(snat)
    before = parse_save(save_of(chains, with_filter=others))
    payload = restore_payload(plan, before)
    after = before.chains if payload is None else apply_restore(before.chains, payload)
    # converged: exactly one jump each, our chains hold exactly the plan, nobody else's rules touched
    state = NatState(after)
    assert state.jump_count("PREROUTING", DNAT_CHAIN) == 1
    assert state.jump_count("POSTROUTING", SNAT_CHAIN) == 1
    assert state.ours() == desired_chains(plan)
    for name, rules in before.chains.items():
        if name not in (DNAT_CHAIN, SNAT_CHAIN):
            assert [r for r in after[name] if r not in (f"-j {DNAT_CHAIN}", f"-j {SNAT_CHAIN}")] == \
                [r for r in rules if r not in (f"-j {DNAT_CHAIN}", f"-j {SNAT_CHAIN}")]
    # and the next run has nothing to do
    assert restore_payload(plan, parse_save(save_of(after, with_filter=False))) is None


@MODEST
@given(plans())
def test_render_applied_to_empty_table_converges(plan: NatRules) -> None:
    empty: dict[str, list[str]] = {"PREROUTING": [], "INPUT": [], "OUTPUT": [], "POSTROUTING": []}
    after = apply_restore(empty, render(plan))
    assert restore_payload(plan, NatState(after)) is None

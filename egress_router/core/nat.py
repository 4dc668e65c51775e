"""NAT as data: the router's rules in chains it owns, iptables-restore payloads, iptables-save parsing (pure).

Like kube-proxy, every rule lives in chains the router owns, jumped to from the built-in chains, and
the whole change is one `iptables-restore --noflush` payload: it applies whole or not at all, works
with the nft and the legacy backend alike, and leaves other owners' rules alone. net.iptables runs it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from .config import RouterConfig
from .redirect import Destinations

DNAT_CHAIN = "EGRESS-ROUTER-DNAT"
SNAT_CHAIN = "EGRESS-ROUTER-SNAT"
# built-in chain -> our chain it jumps to
JUMPS = {"PREROUTING": DNAT_CHAIN, "POSTROUTING": SNAT_CHAIN}
BACKENDS = ("nft", "legacy")  # EGRESS_IPTABLES=auto looks at both


@dataclass(frozen=True, slots=True)
class NatRules:
    """The plan's NAT step: our chains and their rule specifications (as iptables-save prints them),
    written in one iptables-restore transaction together with the jumps to them."""

    chains: tuple[tuple[str, tuple[str, ...]], ...]

    def render(self) -> str:
        """The payload as applied to a namespace that has none of our rules yet."""
        return render(self)

    def __str__(self) -> str:
        return f"NAT rules ({sum(len(rules) for _, rules in self.chains)} in {', '.join(c for c, _ in self.chains)})"


def nat_rules(destinations: Destinations, pod_interface: str, interface: str, source: IPv4Address) -> NatRules:
    """DNAT what arrives on the pod interface as `destinations` say; SNAT what leaves `interface` to `source`."""
    return NatRules((
        (DNAT_CHAIN, tuple(dnat_specs(destinations, pod_interface))),
        (SNAT_CHAIN, (f"-o {interface} -j SNAT --to-source {source}",)),
    ))


def dnat_specs(destinations: Destinations, pod_interface: str, *, legacy: bool = False) -> list[str]:
    """DNAT rule specifications in order; `legacy` gives the legacy image's spelling (no -m)."""
    specs = []
    for rule in destinations.rules:
        match = f"-p {rule.proto} --dport {rule.port}" if legacy else \
            f"-p {rule.proto} -m {rule.proto} --dport {rule.port}"
        target = str(rule.ip) if rule.remote_port is None else f"{rule.ip}:{rule.remote_port}"
        specs.append(f"-i {pod_interface} {match} -j DNAT --to-destination {target}")
    if destinations.fallback is not None:
        specs.append(f"-i {pod_interface} -j DNAT --to-destination {destinations.fallback}")
    return specs


def legacy_lines(config: RouterConfig) -> list[str]:
    """What the legacy image printed in unit-test mode."""
    assert config.destinations is not None and config.source is not None
    lines = [f"-A PREROUTING {spec}" for spec in dnat_specs(config.destinations, config.pod_interface, legacy=True)]
    lines.append(f"-A POSTROUTING -j SNAT --to-source {config.source.ip}")
    return lines


def desired_chains(nat: NatRules) -> dict[str, list[str]]:
    """Our chains and their rule specifications, as iptables-save prints them."""
    return {chain: list(rules) for chain, rules in nat.chains}


@dataclass(frozen=True, slots=True)
class NatState:
    """The nat table as iptables-save showed it: chain -> rule specifications (in order)."""

    chains: dict[str, list[str]] = field(default_factory=dict)

    def jump_count(self, builtin: str, target: str) -> int:
        return self.chains.get(builtin, []).count(f"-j {target}")

    def ours(self) -> dict[str, list[str]]:
        return {name: rules for name, rules in self.chains.items() if name in JUMPS.values()}


def parse_save(text: str) -> NatState:
    """Parse `iptables-save -t nat` output (other tables, comments and counters are ignored)."""
    chains: dict[str, list[str]] = {}
    in_nat = False
    for line in text.splitlines():
        if line.startswith("[") and "] " in line:  # iptables-save -c puts rule counters first
            line = line.split("] ", 1)[1]
        if line.startswith("*"):
            in_nat = line == "*nat"
        elif not in_nat or line.startswith("#") or line == "COMMIT":
            continue
        elif line.startswith(":"):
            chains.setdefault(line[1:].split(" ", 1)[0], [])
        elif line.startswith("-A "):
            chain, _, spec = line[3:].partition(" ")
            chains.setdefault(chain, []).append(spec)
    return NatState(chains)


def restore_payload(nat: NatRules, state: NatState) -> str | None:
    """The iptables-restore --noflush input converging `state` to `nat`; None if already there."""
    wanted = desired_chains(nat)
    jumps_ok = all(state.jump_count(b, t) == 1 for b, t in JUMPS.items())
    if jumps_ok and all(state.chains.get(c) == rules for c, rules in wanted.items()):
        return None
    lines = ["*nat"]
    # With --noflush, declaring a chain that exists flushes it: the rules below replace it whole.
    lines += [f":{chain} - [0:0]" for chain in wanted]
    lines += [f"-A {chain} {spec}" for chain, specs in wanted.items() for spec in specs]
    lines += jump_fixups(state)
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def jump_fixups(state: NatState) -> list[str]:
    """Add a missing jump, or delete surplus copies of it, so each built-in chain jumps to ours once."""
    lines = []
    for builtin, target in JUMPS.items():
        count = state.jump_count(builtin, target)
        if count == 0:
            lines.append(f"-A {builtin} -j {target}")
        lines += [f"-D {builtin} -j {target}"] * max(0, count - 1)
    return lines


def rollback_payload(before: NatState) -> str:
    """The payload that puts our chains and jumps back the way `before` had them."""
    previous = before.ours()
    lines = ["*nat"]
    lines += [f":{chain} - [0:0]" for chain in JUMPS.values()]
    lines += [f"-A {chain} {spec}" for chain in JUMPS.values() for spec in previous.get(chain, [])]
    for builtin, target in JUMPS.items():
        # after apply there is exactly one jump; put back as many as there were (often none)
        wanted = before.jump_count(builtin, target)
        lines += [f"-D {builtin} -j {target}"] * max(0, 1 - wanted)
        lines += [f"-A {builtin} -j {target}"] * max(0, wanted - 1)
    lines += [f"-X {chain}" for chain in JUMPS.values() if chain not in previous]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def render(nat: NatRules) -> str:
    """The payload as applied to a namespace that has none of our rules yet."""
    payload = restore_payload(nat, NatState())
    assert payload is not None
    return payload


def backend_tools(backend: str) -> tuple[str, str]:
    """The save and restore tool names of an iptables backend ("nft" or "legacy")."""
    return f"iptables-{backend}-save", f"iptables-{backend}-restore"


def count_rules(save_text: str) -> int:
    """How many rules an iptables-save dump holds, over all tables."""
    return sum(1 for line in save_text.splitlines() if line.startswith("-A "))


def choose_backend(rules: dict[str, int]) -> str:
    """EGRESS_IPTABLES=auto: the backend that already has rules (more of them), else nft.

    As kube's iptables-wrapper decides: the rules already in the namespace (a service mesh's init
    container, kubelet) tell which backend the node uses, and mixing the two breaks NAT.
    """
    return "legacy" if rules.get("legacy", 0) > rules.get("nft", 0) else "nft"


def failed_line_hint(message: str, payload: str) -> str:
    """iptables-restore reports 'line N failed'; show that line of our payload too."""
    found = re.search(r"line (\d+) failed", message)
    lines = payload.splitlines()
    if not found or not 1 <= int(found.group(1)) <= len(lines):
        return ""
    return f" (the rule was {lines[int(found.group(1)) - 1]!r})"

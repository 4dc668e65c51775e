"""NAT as data: the router's rules in chains it owns, iptables-restore payloads, iptables-save parsing (pure).

Like kube-proxy, every rule lives in chains the router owns, jumped to from the built-in chains, and
the whole change is one `iptables-restore --noflush` payload: it applies whole or not at all, works
with the nft and the legacy backend alike, and leaves other owners' rules alone. net.iptables runs it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address

from .config import RouterConfig
from .redirect import Destinations

DNAT_CHAIN = "EGRESS-ROUTER-DNAT"
SNAT_CHAIN = "EGRESS-ROUTER-SNAT"
MARK_CHAIN = "EGRESS-ROUTER-MARK"
# built-in chain -> our chain it jumps to, per table
JUMPS = {"PREROUTING": DNAT_CHAIN, "POSTROUTING": SNAT_CHAIN}
MANGLE_JUMPS = {"PREROUTING": MARK_CHAIN, "OUTPUT": MARK_CHAIN}
TABLE_JUMPS = {"nat": JUMPS, "mangle": MANGLE_JUMPS}
BACKENDS = ("nft", "legacy")  # EGRESS_IPTABLES=auto looks at both
BUILTIN = frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"})
# The connection mark of connections that arrived on the pod interface: one bit, clear of the bits
# kube-proxy (0x4000, 0x8000), Calico (0xffff0000 is configurable; its default uses the high bits
# 0x...0000 of its own choosing) and Cilium (0x0f00 and neighbours) are known to use by default.
POD_MARK = 0x2000000


@dataclass(frozen=True, slots=True)
class NatRules:
    """The plan's iptables step: our chains and their rule specifications (as iptables-save prints them)
    in the nat table (redirect modes) and the mangle table (the pod-network return path), written in one
    iptables-restore transaction together with the jumps to them."""

    chains: tuple[tuple[str, tuple[str, ...]], ...]
    mangle: tuple[tuple[str, tuple[str, ...]], ...] = ()
    version: int = 4  # 4: iptables, 6: ip6tables (one transaction per family)

    @property
    def tool(self) -> str:
        return "ip6tables" if self.version == 6 else "iptables"

    def tables(self) -> dict[str, dict[str, list[str]]]:
        """table -> our chains -> rule specifications, for the tables this step manages."""
        found = {}
        if self.chains:
            found["nat"] = {chain: list(rules) for chain, rules in self.chains}
        if self.mangle:
            found["mangle"] = {chain: list(rules) for chain, rules in self.mangle}
        return found

    def render(self) -> str:
        """The payload as applied to a namespace that has none of our rules yet."""
        return render(self)

    def __str__(self) -> str:
        chains = self.chains + self.mangle
        return f"{self.tool} rules ({sum(len(rules) for _, rules in chains)} in {', '.join(c for c, _ in chains)})"


def nat_rules(destinations: Destinations | None, pod_interface: str, interface: str,
              source: IPv4Address | IPv6Address, *, mark_pod_connections: bool = False,
              admin_port: int = 0, heartbeats: bool = False) -> NatRules:
    """DNAT what arrives on the pod interface as `destinations` say; SNAT what leaves `interface` to `source`;
    with `mark_pod_connections`, mark the connections that arrive on the pod interface (see mark_specs);
    with `admin_port`, connections to that TCP port stay with the router (see admin_exemption).
    The rules are those of `source`'s family: `destinations` holds only rules of that family."""
    chains: tuple[tuple[str, tuple[str, ...]], ...] = ()
    if destinations is not None:
        exempt = admin_exemption(pod_interface, admin_port)
        chains = ((DNAT_CHAIN, (*exempt, *dnat_specs(destinations, pod_interface))),
                  (SNAT_CHAIN, (f"-o {interface} -j SNAT --to-source {source}",)))
    # VRRP between the replicas (high availability) is not marked: an advert the peer sends first would make this
    # replica's own adverts the "replies" of its flow, routed by the pod gateway instead of straight to the peer
    unmarked = (f"-p {VRRP} -j RETURN",) if heartbeats else ()
    mangle = ((MARK_CHAIN, (*unmarked, *mark_specs(pod_interface))),) if mark_pod_connections else ()
    return NatRules(chains, mangle, source.version)


def admin_exemption(pod_interface: str, admin_port: int) -> tuple[str, ...]:
    """The admin port's connections (probes, scrapes) leave our DNAT chain before any rule: a fallback
    redirects every port, and would send the kubelet's probes to the fallback destination."""
    return (f"-i {pod_interface} -p tcp -m tcp --dport {admin_port} -j RETURN",) if admin_port else ()


VRRP = 112  # the IP protocol of keepalived's heartbeats


def mark_specs(pod_interface: str) -> tuple[str, ...]:
    """Connections a client opened through the pod interface carry POD_MARK (set on their first packets),
    and every packet of theirs that did not arrive on it (a forwarded reply, the router's own reply) takes
    the mark back for routing, which a policy rule sends through the pod interface's next hop."""
    mark = f"{POD_MARK:#x}"
    return (f"-i {pod_interface} -m conntrack --ctdir ORIGINAL -j CONNMARK --set-xmark {mark}/{mark}",
            f"! -i {pod_interface} -j CONNMARK --restore-mark --nfmask {mark} --ctmask {mark}")


def dnat_specs(destinations: Destinations, pod_interface: str, *, legacy: bool = False) -> list[str]:
    """DNAT rule specifications in order; `legacy` gives the legacy image's spelling (no -m)."""
    specs = []
    for rule in destinations.rules:
        match = f"-p {rule.proto} --dport {rule.port}" if legacy else \
            f"-p {rule.proto} -m {rule.proto} --dport {rule.port}"
        specs.append(f"-i {pod_interface} {match} -j DNAT --to-destination {rule.target}")
    specs += [f"-i {pod_interface} -j DNAT --to-destination {address}" for address in destinations.fallbacks]
    return specs


def legacy_lines(config: RouterConfig) -> list[str]:
    """What the legacy image printed in unit-test mode: the IPv4 lines exactly so; then, in the same form, the
    IPv6 ones (ip6tables), where an IPv6 source is configured."""
    assert config.destinations is not None and config.egress
    lines = []
    for egress in config.egress:
        part = config.destinations.family(egress.version)
        lines += [f"-A PREROUTING {spec}" for spec in dnat_specs(part, config.pod_interface, legacy=True)]
        lines.append(f"-A POSTROUTING -j SNAT --to-source {egress.source.ip}")
    return lines


def desired_chains(nat: NatRules) -> dict[str, list[str]]:
    """Our nat-table chains and their rule specifications, as iptables-save prints them."""
    return {chain: list(rules) for chain, rules in nat.chains}


@dataclass(frozen=True, slots=True, eq=False)
class NatState:
    """The nat and mangle tables as iptables-save showed them: chain -> rule specifications (in order).

    Two states are equal when they hold the same rules and chains: a built-in chain without rules is
    what a table that nothing has used yet amounts to (iptables-nft-save lists a table only once
    something created it, and reading it with -t creates it), so it does not count.
    """

    chains: dict[str, list[str]] = field(default_factory=dict)  # the nat table
    mangle: dict[str, list[str]] = field(default_factory=dict)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NatState):
            return NotImplemented
        return self.meaningful() == other.meaningful()

    def meaningful(self) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        def kept(table: dict[str, list[str]]) -> dict[str, list[str]]:
            return {chain: rules for chain, rules in table.items() if rules or chain not in BUILTIN}

        return kept(self.chains), kept(self.mangle)

    def table(self, name: str) -> dict[str, list[str]]:
        return self.mangle if name == "mangle" else self.chains

    def jump_count(self, builtin: str, target: str, table: str = "nat") -> int:
        return self.table(table).get(builtin, []).count(f"-j {target}")

    def ours(self, table: str = "nat") -> dict[str, list[str]]:
        mine = set(TABLE_JUMPS[table].values())
        return {name: rules for name, rules in self.table(table).items() if name in mine}


def parse_save(text: str) -> NatState:
    """Parse `iptables-save` output of the nat and mangle tables (other tables, comments and counters are
    ignored)."""
    tables: dict[str, dict[str, list[str]]] = {"nat": {}, "mangle": {}}
    chains: dict[str, list[str]] | None = None
    for line in text.splitlines():
        if line.startswith("[") and "] " in line:  # iptables-save -c puts rule counters first
            line = line.split("] ", 1)[1]
        if line.startswith("*"):
            chains = tables.get(line[1:])
        elif chains is None or line.startswith("#") or line == "COMMIT":
            continue
        elif line.startswith(":"):
            chains.setdefault(line[1:].split(" ", 1)[0], [])
        elif line.startswith("-A "):
            chain, _, spec = line[3:].partition(" ")
            chains.setdefault(chain, []).append(PROTOCOL_NAME.sub(f"-p {VRRP}", spec))
    return NatState(tables["nat"], tables["mangle"])


# iptables-save names a protocol by /etc/protocols where the system has one (`-p vrrp`), by number where it does
# not (the image): the rules are written, and compared, by number
PROTOCOL_NAME = re.compile(r"(?<!\S)-p vrrp(?!\S)")


def restore_payload(nat: NatRules, state: NatState) -> str | None:
    """The iptables-restore --noflush input converging `state` to `nat`; None if already there.
    One section per table that differs, in one payload (one iptables-restore run)."""
    sections = []
    for table, wanted in nat.tables().items():
        current, jumps = state.table(table), TABLE_JUMPS[table]
        jumps_ok = all(state.jump_count(b, t, table) == 1 for b, t in jumps.items())
        if jumps_ok and all(current.get(c) == rules for c, rules in wanted.items()):
            continue
        lines = [f"*{table}"]
        # With --noflush, declaring a chain that exists flushes it: the rules below replace it whole.
        lines += [f":{chain} - [0:0]" for chain in wanted]
        lines += [f"-A {chain} {spec}" for chain, specs in wanted.items() for spec in specs]
        lines += jump_fixups(state, table)
        lines.append("COMMIT")
        sections += lines
    return "\n".join(sections) + "\n" if sections else None


def jump_fixups(state: NatState, table: str = "nat") -> list[str]:
    """Add a missing jump, or delete surplus copies of it, so each built-in chain jumps to ours once."""
    lines = []
    for builtin, target in TABLE_JUMPS[table].items():
        count = state.jump_count(builtin, target, table)
        if count == 0:
            lines.append(f"-A {builtin} -j {target}")
        lines += [f"-D {builtin} -j {target}"] * max(0, count - 1)
    return lines


def rollback_payload(before: NatState, tables: tuple[str, ...] = ("nat",)) -> str:
    """The payload that puts our chains and jumps in `tables` back the way `before` had them."""
    lines = []
    for table in tables:
        previous, jumps = before.ours(table), TABLE_JUMPS[table]
        ours = list(dict.fromkeys(jumps.values()))
        lines.append(f"*{table}")
        lines += [f":{chain} - [0:0]" for chain in ours]
        lines += [f"-A {chain} {spec}" for chain in ours for spec in previous.get(chain, [])]
        for builtin, target in jumps.items():
            # after apply there is exactly one jump; put back as many as there were (often none)
            wanted = before.jump_count(builtin, target, table)
            lines += [f"-D {builtin} -j {target}"] * max(0, 1 - wanted)
            lines += [f"-A {builtin} -j {target}"] * max(0, wanted - 1)
        lines += [f"-X {chain}" for chain in ours if chain not in previous]
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def render(nat: NatRules) -> str:
    """The payload as applied to a namespace that has none of our rules yet."""
    payload = restore_payload(nat, NatState())
    assert payload is not None
    return payload


def backend_tools(backend: str, version: int = 4) -> tuple[str, str]:
    """The save and restore tool names of an iptables backend ("nft" or "legacy"), for IPv4 or IPv6."""
    tool = "ip6tables" if version == 6 else "iptables"
    return f"{tool}-{backend}-save", f"{tool}-{backend}-restore"


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

"""The packet and byte counters of the router's NAT rules: `iptables-save -c` text to labelled rows (pure)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from .nat import DNAT_CHAIN, SNAT_CHAIN

Labels = tuple[tuple[str, str], ...]
FALLBACK_PROTOCOL = "all"  # a fallback rule matches every protocol and port: protocol="all", port=""


@dataclass(frozen=True, slots=True)
class RuleCounter:
    """One rule of one of our chains and its counters, as `iptables-save -c` printed them."""

    chain: str
    spec: str
    packets: int
    bytes: int


COUNTED_RULE = re.compile(r"^\[(\d+):(\d+)\] -A (\S+) (.*)$", re.M)
# our rules' shapes exactly (core.nat.dnat_specs, nat_rules), as both backends' save tools print them; a rule of
# another shape in our chain (someone else's) gets no labels and is left out
REDIRECT = re.compile(r"-i \S+ (?:-p (\S+) -m \S+ --dport (\S+) )?-j DNAT --to-destination (\S+)")
SNAT = re.compile(r"-o (\S+) -j SNAT --to-source (\S+)")


def parse_counters(text: str, chains: Iterable[str] = (DNAT_CHAIN, SNAT_CHAIN)) -> list[RuleCounter]:
    """The rules of `chains` in the nat table of `iptables-save -c` output, in order, with their counters
    (`[packets:bytes] -A CHAIN spec`); other tables and chains, and rules without counters, are skipped.
    One regular expression over the nat table's text: with 10,000 rules, a loop over lines took 4 times as long."""
    start = text.find("*nat\n")
    if start < 0:
        return []
    end = text.find("\nCOMMIT", start)
    wanted = frozenset(chains)
    return [RuleCounter(chain, spec, int(packets), int(size)) for packets, size, chain, spec
            in COUNTED_RULE.findall(text, start, len(text) if end < 0 else end) if chain in wanted]


def redirect_labels(spec: str) -> Labels | None:
    """(protocol, port, destination) of one of our DNAT rules; None for a rule that redirects nothing (the admin
    port's RETURN, or a rule someone else put in our chain)."""
    found = REDIRECT.fullmatch(spec)
    if found is None:
        return None
    protocol, port, destination = found.groups()
    return (("protocol", protocol or FALLBACK_PROTOCOL), ("port", port or ""), ("destination", destination))


def snat_labels(spec: str) -> Labels | None:
    """(interface, source) of our SNAT rule; None for anything else."""
    found = SNAT.fullmatch(spec)
    if found is None:
        return None
    return (("interface", found.group(1)), ("source", found.group(2)))


@dataclass(frozen=True, slots=True)
class Rows:
    """The rows of the four counter families, each (labels, value); labels start with the family."""

    redirect_packets: list[tuple[Labels, float]]
    redirect_bytes: list[tuple[Labels, float]]
    snat_packets: list[tuple[Labels, float]]
    snat_bytes: list[tuple[Labels, float]]


def counter_rows(per_family: dict[int, list[RuleCounter]]) -> Rows:
    """Rows for the metrics, IPv4 first; rules with the same labels (which the grammar does not produce, but a
    hand-made rule in our chain could) are summed, so each series appears once as the format requires."""
    redirects: dict[Labels, list[int]] = {}
    snats: dict[Labels, list[int]] = {}
    for version in sorted(per_family):
        family = (("family", str(version)),)
        for counter in per_family[version]:
            if counter.chain == DNAT_CHAIN:
                labels, into = redirect_labels(counter.spec), redirects
            elif counter.chain == SNAT_CHAIN:
                labels, into = snat_labels(counter.spec), snats
            else:
                continue
            if labels is None:
                continue
            total = into.setdefault(family + labels, [0, 0])
            total[0] += counter.packets
            total[1] += counter.bytes
    return Rows([(labels, packets) for labels, (packets, _) in redirects.items()],
                [(labels, size) for labels, (_, size) in redirects.items()],
                [(labels, packets) for labels, (packets, _) in snats.items()],
                [(labels, size) for labels, (_, size) in snats.items()])

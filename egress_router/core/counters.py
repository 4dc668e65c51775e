"""The packet and byte counters of the router's NAT rules: `iptables-save -c` text to labelled rows (pure)."""

from __future__ import annotations

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


def parse_counters(text: str, chains: Iterable[str] = (DNAT_CHAIN, SNAT_CHAIN)) -> list[RuleCounter]:
    """The rules of `chains` in the nat table of `iptables-save -c` output, in order, with their counters
    (`[packets:bytes] -A CHAIN spec`); other tables and chains, and rules without counters, are skipped."""
    wanted = frozenset(chains)
    found: list[RuleCounter] = []
    in_nat = False
    for line in text.splitlines():
        if line.startswith("*"):
            in_nat = line == "*nat"
            continue
        if not in_nat or not line.startswith("["):
            continue
        counts, _, rule = line[1:].partition("] -A ")
        chain, _, spec = rule.partition(" ")
        if chain not in wanted:
            continue
        packets, _, size = counts.partition(":")
        try:
            found.append(RuleCounter(chain, spec, int(packets), int(size)))
        except ValueError:
            continue  # not a counter pair: a line this parser does not know
    return found


def options(spec: str) -> dict[str, str]:
    """A rule specification's options and their values (`-p tcp --dport 80` -> {'-p': 'tcp', '--dport': '80'});
    our rules carry no quoted values, so splitting at blanks is enough."""
    words = spec.split()
    found: dict[str, str] = {}
    for index, word in enumerate(words):
        if word.startswith("-") and index + 1 < len(words) and not words[index + 1].startswith("-"):
            found.setdefault(word, words[index + 1])
    return found


def redirect_labels(spec: str) -> Labels | None:
    """(protocol, port, destination) of one of our DNAT rules; None for a rule that redirects nothing (the admin
    port's RETURN, or a rule someone else put in our chain)."""
    found = options(spec)
    if found.get("-j") != "DNAT" or "--to-destination" not in found:
        return None
    return (("protocol", found.get("-p", FALLBACK_PROTOCOL)), ("port", found.get("--dport", "")),
            ("destination", found["--to-destination"]))


def snat_labels(spec: str) -> Labels | None:
    """(interface, source) of our SNAT rule; None for anything else."""
    found = options(spec)
    if found.get("-j") != "SNAT" or "--to-source" not in found:
        return None
    return (("interface", found.get("-o", "")), ("source", found["--to-source"]))


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

"""Forgets the tracked UDP flows a reload re-pointed: a rule removed or changed, the fallback changed.

Netfilter applies DNAT once per connection, when it is tracked; later packets follow the entry, so a
UDP flow that never pauses would keep reaching the old destination after a reload. As kube-proxy does,
only UDP entries are deleted: established TCP and SCTP connections keep their destination until they
end (deleting them would reset them), new ones take the new rules at once.
"""

from __future__ import annotations

import logging
import socket
from ipaddress import ip_address

from ..core.redirect import Destinations
from .pyroute import conntrack_classes

log = logging.getLogger(__name__)


def repointed_udp_flows(old: Destinations, new: Destinations) -> int:
    """Delete the UDP entries that `old` redirected somewhere `new` no longer does (each family in its own
    table dump); returns how many."""
    return sum(family_flows(old.family(version), new.family(version), version) for version in old.versions)


def family_flows(old: Destinations, new: Destinations, version: int) -> int:
    """repointed_udp_flows for the rules of one family (`old` and `new` hold only those)."""
    if not any(rule.proto == "udp" for rule in old.rules) and not old.fallbacks:
        return 0
    Conntrack, NFCTAttrTuple = conntrack_classes()  # noqa: N806 (classes)
    old_targets, new_targets = old.targets(), new.targets()
    deleted = 0
    family = socket.AF_INET6 if version == 6 else socket.AF_INET
    # The netlink message's own family (nfgen_family) is what the kernel dumps and parses a deleted tuple with;
    # pyroute2 sends AF_INET unless told, and its tuple filter's family then only drops the IPv4 entries.
    conntrack = Conntrack(nfgen_family=family)
    try:
        for entry in list(conntrack.dump_entries(tuple_orig=NFCTAttrTuple(family=family, proto=socket.IPPROTO_UDP))):
            orig, reply = entry.tuple_orig, entry.tuple_reply
            port = orig.dport
            was = old.target("udp", port, old_targets)
            if was is None or (ip_address(reply.saddr), reply.sport) != was:
                continue  # not redirected by our old rules (the router's own flows, others' DNAT)
            if new.target("udp", port, new_targets) == was:
                continue
            try:
                conntrack.delete(entry)
                deleted += 1
            except OSError as exc:  # it ended meanwhile
                log.debug("Could not forget the UDP flow %s: %s", entry, exc)
    finally:
        conntrack.close()
    return deleted


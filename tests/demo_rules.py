"""The nat rules the demo configuration (lab.DEMO_DESTINATION) must produce, as `iptables -S` prints them.

Written out by hand, not derived from egress_router.core.nat, so the lab and container tests check the
code against an independent statement of what it should do.
"""

from __future__ import annotations

from egress_router.core.nat import DNAT_CHAIN, SNAT_CHAIN


def demo_dnat_rules(pod_interface: str = "eth0") -> list[str]:
    return [
        f"-N {DNAT_CHAIN}",
        f"-A {DNAT_CHAIN} -i {pod_interface} -p tcp -m tcp --dport 80 -j DNAT --to-destination 203.0.113.10",
        f"-A {DNAT_CHAIN} -i {pod_interface} -p tcp -m tcp --dport 8080 -j DNAT --to-destination 203.0.113.11:80",
        f"-A {DNAT_CHAIN} -i {pod_interface} -p udp -m udp --dport 53 -j DNAT --to-destination 203.0.113.10:5353",
        f"-A {DNAT_CHAIN} -i {pod_interface} -j DNAT --to-destination 203.0.113.12",
    ]


def demo_snat_rules(egress_interface: str, source: str) -> list[str]:
    return [f"-N {SNAT_CHAIN}", f"-A {SNAT_CHAIN} -o {egress_interface} -j SNAT --to-source {source}"]

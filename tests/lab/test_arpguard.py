"""Second holders on a real LAN: two pods' macvlans on one bridge, each probing for the other."""

from __future__ import annotations

import errno
import select
import socket
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address

import pytest

from egress_router.lab import Lab
from egress_router.net import arp, ndp
from egress_router.net.arpguard import Prober, mac_text
from tests.lab.conftest import require_lab

VIP = IPv4Address("192.0.2.99")
UNHELD = IPv4Address("192.0.2.98")
VIP6 = IPv6Address("2001:db8:2::99")
UNHELD6 = IPv6Address("2001:db8:2::98")
PODS = ("poda", "podb")
# long enough for a reply across a bridge on a loaded machine; the figure the guard uses is 0.03
WAIT = 0.5


class GuardLab(Lab):
    """lan: br0 with one veth port per pod; each pod's macvlan0 sits on the other end of its veth,
    which stays in lan (the node side), as the CNI macvlan plugin leaves the parent on the node.
    A parent inside the pod would answer ARP for the pod's address a second time (spike F1)."""

    roles: tuple[str, ...] = ("lan", *PODS)

    def build(self) -> None:
        self.create_namespaces()
        with self.iproute("lan") as ipr:
            self._up(ipr, "lo")
            ipr.link("add", ifname="br0", kind="bridge")
            bridge = self._up(ipr, "br0")
            for pod in self.roles[1:]:
                ipr.link("add", ifname=f"{pod}-node", kind="veth", peer={"ifname": f"{pod}-port"})
                ipr.link("set", index=ipr.link_lookup(ifname=f"{pod}-port")[0], master=bridge)
                self._up(ipr, f"{pod}-port")
                parent = self._up(ipr, f"{pod}-node")
                ipr.link("add", ifname="mvtmp", kind="macvlan", link=parent, macvlan_mode="bridge")
                ipr.link("set", index=ipr.link_lookup(ifname="mvtmp")[0], net_ns_fd=self.path(pod), ifname="macvlan0")
        for pod in self.roles[1:]:
            with self.iproute(pod) as ipr:
                self._up(ipr, "lo")
                self._up(ipr, "macvlan0")
        self.settle()

    def mac(self, pod: str) -> str:
        with self.iproute(pod) as ipr:
            mac: str = ipr.get_links(ipr.link_lookup(ifname="macvlan0")[0])[0].get("IFLA_ADDRESS")
        return mac

    def hold(self, pod: str, address: IPv4Address | IPv6Address) -> None:
        """Add the address as the router does (IPv6: nodad, usable at once)."""
        prefix = ["ip", "-6"] if address.version == 6 else ["ip"]
        extra = ["nodad"] if address.version == 6 else []
        self.exec(pod, [*prefix, "addr", "add", f"{address}/{24 if address.version == 4 else 64}", "dev", "macvlan0",
                        *extra], check=True)
        self.settle()

    def link(self, pod: str, state: str) -> None:
        self.exec(pod, ["ip", "link", "set", "macvlan0", state], check=True)
        self.settle()

    def prober(self, pod: str) -> Prober:
        """A prober whose sockets are made inside the pod (they stay in its namespace)."""
        prober = Prober("macvlan0")
        with self.entered(pod):
            prober.open(4)
            prober.open(6)
        return prober


class ThreePodLab(GuardLab):
    roles = ("lan", *PODS, "podc")


@pytest.fixture
def guardlab() -> Iterator[GuardLab]:
    require_lab()
    built = GuardLab()
    with built:  # torn down on exit, also when the test or the build fails
        yield built


@pytest.fixture
def probers(guardlab: GuardLab) -> Iterator[dict[str, Prober]]:
    made = {pod: guardlab.prober(pod) for pod in PODS}
    try:
        yield made
    finally:
        for prober in made.values():
            prober.close()


ADDRESSES = [pytest.param((VIP, UNHELD), id="ipv4"), pytest.param((VIP6, UNHELD6), id="ipv6")]


@pytest.mark.parametrize("pair", ADDRESSES)
def test_two_holders_each_finds_exactly_the_other(guardlab: GuardLab, probers: dict[str, Prober],
                                                  pair: tuple[IPv4Address | IPv6Address, ...]) -> None:
    address = pair[0]
    for pod in PODS:
        guardlab.hold(pod, address)
    a, b = guardlab.mac("poda"), guardlab.mac("podb")
    assert a != b
    assert probers["poda"].second_holders(address, WAIT) == {b}
    assert probers["podb"].second_holders(address, WAIT) == {a}
    # again, on the same sockets: they are kept, and an earlier answer does not count twice
    assert probers["poda"].second_holders(address, WAIT) == {b}


@pytest.mark.parametrize("pair", ADDRESSES)
def test_one_holder_hears_nobody_and_the_other_pod_finds_it(guardlab: GuardLab, probers: dict[str, Prober],
                                                            pair: tuple[IPv4Address | IPv6Address, ...]) -> None:
    address = pair[0]
    guardlab.hold("poda", address)
    assert probers["poda"].second_holders(address, WAIT) == set()
    # the same probe from a pod without the address is answered: the empty set above is not deafness
    assert probers["podb"].second_holders(address, WAIT) == {guardlab.mac("poda")}


@pytest.mark.parametrize("second", ["ipv4", "ipv6", "both"])
def test_both_families_probed_at_once_each_second_holder_found(guardlab: GuardLab, probers: dict[str, Prober],
                                                               second: str) -> None:
    """Dual-stack: poda holds both addresses, podb one of them or both; one call asks for both and tells them
    apart (a second holder of either counts), within one wait."""
    for address in (VIP, VIP6):
        guardlab.hold("poda", address)
    held = {"ipv4": (VIP,), "ipv6": (VIP6,), "both": (VIP, VIP6)}[second]
    for address in held:
        guardlab.hold("podb", address)
    b = guardlab.mac("podb")
    found = probers["poda"].second_holders_of([VIP, VIP6], WAIT)
    assert found == {VIP: {b} if VIP in held else set(), VIP6: {b} if VIP6 in held else set()}
    # again on the same sockets; and from podb, which finds poda for each address it asks about
    assert probers["poda"].second_holders_of([VIP, VIP6], WAIT) == found
    assert probers["podb"].second_holders_of([VIP, VIP6], WAIT) == {VIP: {guardlab.mac("poda")},
                                                                    VIP6: {guardlab.mac("poda")}}


@pytest.mark.parametrize("pair", ADDRESSES)
def test_an_address_nobody_holds_while_both_hold_another(guardlab: GuardLab, probers: dict[str, Prober],
                                                         pair: tuple[IPv4Address | IPv6Address, ...]) -> None:
    held, unheld = pair
    for pod in PODS:
        guardlab.hold(pod, held)
    probers["poda"].probe(unheld)
    # the other holder talks about the held address meanwhile: its announcements are for another address
    with guardlab.entered("podb"):
        if isinstance(held, IPv4Address):
            arp.announce("macvlan0", guardlab.mac("podb"), held)
        else:
            ndp.announce("macvlan0", guardlab.mac("podb"), held)
    assert probers["poda"].others(unheld, WAIT) == set()
    # and the frames were there to be seen: asking about the held address finds them (no probe sent)
    with guardlab.entered("podb"):
        if isinstance(held, IPv4Address):
            arp.announce("macvlan0", guardlab.mac("podb"), held)
        else:
            ndp.announce("macvlan0", guardlab.mac("podb"), held)
    assert probers["poda"].others(held, WAIT) == {guardlab.mac("podb")}


def test_an_announcement_counts_and_our_own_does_not(guardlab: GuardLab, probers: dict[str, Prober]) -> None:
    # nobody holds the address in a kernel: only the announcements speak
    a, b = guardlab.mac("poda"), guardlab.mac("podb")
    with guardlab.entered("poda"):
        arp.announce("macvlan0", a, VIP)  # our own: seen by our socket as outgoing, never reported
    assert probers["poda"].others(VIP, WAIT) == set()
    with guardlab.entered("podb"):
        arp.announce("macvlan0", b, VIP)  # reply and request form, both with sender IP = the address
    assert probers["poda"].others(VIP, WAIT) == {b}


def test_a_frame_that_names_our_mac_as_sender_is_ours(guardlab: GuardLab, probers: dict[str, Prober]) -> None:
    """What a reflecting LAN (a hairpin port, VEPA) hands back: our own ARP, from another port.

    A socket bound to ETH_P_ARP never sees what this host sends (only ETH_P_ALL taps do), and the
    macvlan drops broadcasts with its own Ethernet source, so pod b forges it: Ethernet source b,
    ARP sender a's MAC and the address."""
    a, b = guardlab.mac("poda"), guardlab.mac("podb")
    ours = arp.announcement(a, VIP, reply=False)
    frame = arp.BROADCAST + arp.mac_bytes(b) + ours[12:]  # Ethernet source b, then a's ARP message
    with guardlab.entered("podb"):
        sock = probers["podb"].open(4)
    sock.send(frame)
    assert probers["poda"].others(VIP, WAIT) == set()
    # the same frame with b as ARP sender is another holder: the filter above is the sender MAC's
    sock.send(arp.announcement(b, VIP, reply=False))
    assert probers["poda"].others(VIP, WAIT) == {b}


def test_a_plain_request_from_the_address_is_not_answered_the_probe_is(guardlab: GuardLab,
                                                                        probers: dict[str, Prober]) -> None:
    """Spike F5, the reason for the probe form: the other holder drops a request from its own address."""
    for pod in PODS:
        guardlab.hold(pod, VIP)
    a = guardlab.mac("poda")
    plain = arp.announcement(a, VIP, reply=False)[:32] + b"\x00" * 6 + VIP.packed  # who-has VIP, tell VIP
    with guardlab.entered("poda"):
        sock = probers["poda"].open(4)
    sock.send(plain)
    assert probers["poda"].others(VIP, WAIT) == set()
    assert probers["poda"].second_holders(VIP, WAIT) == {guardlab.mac("podb")}


@pytest.mark.parametrize("address", [pytest.param(VIP, id="ipv4"), pytest.param(VIP6, id="ipv6")])
def test_the_prober_survives_its_interface_going_down_and_up(guardlab: GuardLab, probers: dict[str, Prober],
                                                             address: IPv4Address | IPv6Address) -> None:
    for pod in PODS:
        guardlab.hold(pod, address)
    prober, b = probers["poda"], guardlab.mac("podb")
    assert prober.second_holders(address, WAIT) == {b}
    guardlab.link("poda", "down")
    with pytest.raises(OSError) as raised:
        prober.second_holders(address, WAIT)
    assert raised.value.errno == errno.ENETDOWN
    guardlab.link("poda", "up")
    if address.version == 6:  # IPv6 addresses go with the link (keep_addr_on_down=0); IPv4 ones stay
        guardlab.hold("poda", address)
    assert prober.second_holders(address, WAIT) == {b}
    assert probers["podb"].second_holders(address, WAIT) == {guardlab.mac("poda")}


@pytest.mark.parametrize("address", [pytest.param(VIP, id="ipv4"), pytest.param(VIP6, id="ipv6")])
def test_the_prober_reopens_after_its_interface_is_replaced(guardlab: GuardLab, probers: dict[str, Prober],
                                                            address: IPv4Address | IPv6Address) -> None:
    for pod in PODS:
        guardlab.hold(pod, address)
    prober = probers["poda"]
    old = guardlab.mac("poda")
    assert prober.second_holders(address, WAIT) == {guardlab.mac("podb")}
    # a new macvlan0 (new index, new MAC) for pod a, the way a pod sandbox can be rebuilt
    guardlab.exec("poda", ["ip", "link", "del", "macvlan0"], check=True)
    with guardlab.iproute("lan") as ipr:
        parent = ipr.link_lookup(ifname="poda-node")[0]
        ipr.link("add", ifname="mvtmp", kind="macvlan", link=parent, macvlan_mode="bridge")
        ipr.link("set", index=ipr.link_lookup(ifname="mvtmp")[0], net_ns_fd=guardlab.path("poda"), ifname="macvlan0")
    guardlab.link("poda", "up")
    guardlab.hold("poda", address)
    assert guardlab.mac("poda") != old
    with pytest.raises(OSError) as raised:  # the old socket's device is gone
        prober.second_holders(address, WAIT)
    assert raised.value.errno in (errno.ENODEV, errno.ENXIO)
    with guardlab.entered("poda"):  # the next call binds afresh, in the pod's namespace
        assert prober.second_holders(address, WAIT) == {guardlab.mac("podb")}
    assert mac_text(prober.mac(address.version)) == guardlab.mac("poda")  # the new MAC, from the new socket
    assert probers["podb"].second_holders(address, WAIT) == {guardlab.mac("poda")}


def test_the_ipv6_socket_sees_neighbour_discovery_only(guardlab: GuardLab, probers: dict[str, Prober]) -> None:
    """The BPF filter: other IPv6 traffic (here UDP to all nodes) reaches the pod, not the prober's socket."""
    for pod in PODS:
        guardlab.hold(pod, VIP6)
    with guardlab.entered("poda"):
        sock = probers["poda"].open(6)
        listener = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    with guardlab.entered("podb"):
        sender = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        index = socket.if_nametoindex("macvlan0")
    with listener, sender:
        listener.bind(("::", 9999))
        listener.settimeout(5)
        sender.sendto(b"not neighbour discovery", ("ff02::1", 9999, 0, index))
        assert listener.recvfrom(64)[0] == b"not neighbour discovery"  # it did reach pod a
        with guardlab.entered("podb"):
            ndp.announce("macvlan0", guardlab.mac("podb"), VIP6)
        frames = []
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        while poller.poll(int(WAIT * 1000)):  # whatever is queued, until the LAN is quiet for WAIT
            frames.append(sock.recv(2048))
    kinds = [frame[54] for frame in frames if frame[12:14] == b"\x86\xdd" and frame[20] == socket.IPPROTO_ICMPV6]
    assert len(kinds) == len(frames), "only ICMPv6 frames"
    assert set(kinds) <= {135, 136}
    assert 136 in kinds  # the announcement came through


@pytest.mark.parametrize("address", [pytest.param(VIP, id="ipv4"), pytest.param(VIP6, id="ipv6")])
def test_three_holders_each_finds_both_others(address: IPv4Address | IPv6Address) -> None:
    require_lab()
    lab = ThreePodLab()
    with lab:
        pods = lab.roles[1:]
        for pod in pods:
            lab.hold(pod, address)
        macs = {pod: lab.mac(pod) for pod in pods}
        assert len(set(macs.values())) == 3
        for pod in pods:
            prober = lab.prober(pod)
            with prober:
                assert prober.second_holders(address, WAIT) == {mac for other, mac in macs.items() if other != pod}

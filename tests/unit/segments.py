"""The TCP segments a test's own loopback connections carry, captured as the kernel sends them (root): what the
proxies put in each segment (a FIN that leaves with the last bytes, not after them) is seen, not inferred."""

from __future__ import annotations

import socket
import struct


class LoopbackSegments:
    """The TCP segments the loopback carries between two ports, as the kernel sends them: an AF_PACKET socket on
    `lo` (root), each frame taken once (as outgoing). `carrying(a, b)`: (payload length, FIN set) of those from
    port a to port b that carry bytes or a FIN (not the SYNs and the bare ACKs)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))  # ETH_P_ALL
        self.sock.bind(("lo", 0))
        self.sock.setblocking(False)
        self.frames: list[bytes] = []

    def take(self) -> None:
        while True:
            try:
                frame, address = self.sock.recvfrom(65536 + 128)
            except BlockingIOError:
                return
            if address[2] == socket.PACKET_OUTGOING:
                self.frames.append(frame)

    def carrying(self, source: int, dest: int) -> list[tuple[int, bool]]:
        self.take()
        found = []
        for frame in self.frames:
            ip = frame[14:]
            if len(ip) < 40 or frame[12:14] != b"\x08\x00" or ip[9] != socket.IPPROTO_TCP:
                continue
            ihl = (ip[0] & 15) * 4
            total = struct.unpack("!H", ip[2:4])[0]
            tcp = ip[ihl:]
            sport, dport = struct.unpack("!HH", tcp[:4])
            payload, fin = total - ihl - (tcp[12] >> 4) * 4, bool(tcp[13] & 1)
            if (sport, dport) == (source, dest) and (payload or fin):
                found.append((payload, fin))
        return found

    def close(self) -> None:
        self.sock.close()

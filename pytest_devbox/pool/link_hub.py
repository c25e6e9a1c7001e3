"""The private network of a topology: a hub on 127.0.0.1 that relays each guest's
Ethernet frames to the other guests of its group.

Each guest's second NIC is a QEMU udp backend (virt/domain_xml.py's `PrivateLink`): it
sends every frame as one datagram from its own port to the hub's, and takes whatever
arrives on its port. The hub floods each frame to every other member (a hub, not a
switch: groups are a handful of guests, and each virtio NIC drops frames not for its
MAC) and drops datagrams from any port that is not a member's, so a group hears only
itself. It is a thread of the process that started the group: a session killed with
-9 takes it with it, as libvirt's autodestroy takes the guests.
"""

from __future__ import annotations

import contextlib
import socket
import threading

from ..virt.domain_xml import LINK_HOST

__all__ = ["Hub", "free_udp_ports"]

FRAME = 65536  # bigger than any frame QEMU sends (MTU 1500, no offloads on this link)
POLL = 0.2  # seconds between looks at `closed`: how long close() may wait


def free_udp_ports(count: int) -> list[int]:
    """`count` UDP ports free on 127.0.0.1 now (the kernel picks; held together so they
    differ). QEMU binds them a moment later: another process could take one meanwhile,
    and that guest's start then fails with libvirt's "Address already in use"."""
    with contextlib.ExitStack() as stack:
        socks = [
            stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            for _ in range(count)
        ]
        for s in socks:
            s.bind((LINK_HOST, 0))
        return [s.getsockname()[1] for s in socks]


class Hub:
    """Relays datagrams among `members` (their UDP ports on 127.0.0.1) until closed."""

    def __init__(self, members: list[int]) -> None:
        self._members = frozenset(members)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((LINK_HOST, 0))
        self._sock.settimeout(POLL)
        self.port: int = self._sock.getsockname()[1]
        self.relayed = 0  # frames passed on (each counted once, however many got it)
        self.dropped = 0  # datagrams from a port that is not a member's
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"devbox-hub-{self.port}")
        self._thread.daemon = True  # never holds the interpreter's exit
        self._thread.start()

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                frame, (host, port) = self._sock.recvfrom(FRAME)
            except socket.timeout:
                continue
            except OSError:
                if self._closed.is_set():
                    return  # closed under us
                continue  # an ICMP error of an earlier send: not this datagram's
            if host != LINK_HOST or port not in self._members:
                self.dropped += 1
                continue
            self.relayed += 1
            for member in self._members:
                if member != port:
                    # A member whose QEMU is gone (its guest stopped first) is no error.
                    with contextlib.suppress(OSError):
                        self._sock.sendto(frame, (LINK_HOST, member))

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5 * POLL)
        self._sock.close()

    def __enter__(self) -> Hub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

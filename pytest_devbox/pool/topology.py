"""A group of guests on a private network of their own (a topology): one fresh guest
per role, each with a second NIC on a link between them, a fixed address and the other
roles' names in /etc/hosts.

The link is libvirt's `type='udp'` interface between the two QEMUs on 127.0.0.1
(virt/domain_xml.py, `PrivateLink`, says why not mcast): no root, no host bridge, and
it survives a restore from a save slot (each restore is given the ports). A topology
has two roles: a udp link has exactly two ends (more would need a switch between them).
Each topology gets free UDP ports of its own, so concurrent topologies cannot see each
other; any local process could still send datagrams to those ports.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator, Mapping

from ..errors import DevboxError
from ..guest.machine import Machine
from ..guest.topology import address_of, check_role, join
from ..virt.domain_xml import LINK_HOST, PrivateLink
from .pool import Pool

ROLES = 2  # the two ends of one udp link


def mac_of(end: int) -> str:
    """The MAC of a topology's `end`-th guest's private NIC: fixed, since a save slot's
    MAC cannot change at restore (so each end has save slots of its own)."""
    return f"52:54:00:d7:77:{end:02x}"


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


def check_roles(roles: Mapping[str, str]) -> None:
    """DevboxError unless `roles` ({role: distro}) is a topology this pool can start."""
    if len(roles) != ROLES:
        raise DevboxError(
            f"a devbox topology has exactly {ROLES} roles (one private link between two "
            f"guests); got {len(roles)}: {', '.join(roles) or 'none'}"
        )
    for role in roles:
        check_role(role)


@contextlib.contextmanager
def topology(pool: Pool, roles: Mapping[str, str]) -> Iterator[dict[str, Machine]]:
    """Fresh guests {role: Machine} of `roles` ({role: distro}, in end order) on a
    private network, each with `.address`; all destroyed at exit (kept as `fresh`
    keeps them: --devbox-keep, or --devbox-keep-failed for a failed test's)."""
    check_roles(roles)
    names = list(roles)
    ports = free_udp_ports(len(names))
    hosts = {role: address_of(end) for end, role in enumerate(names, 1)}
    with contextlib.ExitStack() as stack:
        group: dict[str, Machine] = {}
        for i, role in enumerate(names):
            link = PrivateLink(mac_of(i + 1), ports[i], ports[(i + 1) % len(names)])
            pool.log(f"topology: starting {role} ({roles[role]}) at {hosts[role]}")
            group[role] = stack.enter_context(pool.fresh(roles[role], link=link))
        for end, role in enumerate(names, 1):
            join(group[role], mac_of(end), hosts[role], hosts)
        yield group

"""A group of guests on a private network of their own (a topology): one fresh guest
per role, each with a second NIC on that network, a fixed address and the other roles'
names in /etc/hosts.

Each second NIC is libvirt's `type='udp'` interface on 127.0.0.1 of the guests' host
(virt/domain_xml.py, `PrivateLink`, says why not mcast): no root, no host bridge, no
service, and it survives a restore from a save slot (each restore is given the ports).
Two guests send to each other's port: a link that needs nothing else, lives as long as
they do (a kept group keeps its network) and works on a remote host too. Three or more
send to the group's hub (pool/link_hub.py), a thread of this process: so only on this
host, and a kept group's network ends with the session. Each topology has its own
ports, so concurrent topologies cannot hear each other; any local process could still
send datagrams to a guest's port.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

from ..config.profiles import canonical
from ..config.settings import Settings
from ..errors import DevboxError
from ..guest.machine import Machine
from ..guest.topology import address_of, check_role, join
from ..virt.domain_xml import PrivateLink
from ..virt.qemu_user import is_local
from .link_hub import Hub, free_udp_ports
from .pool import Pool

__all__ = ["MAX_ROLES", "check_roles", "host_of", "mac_of", "topology"]

MAX_ROLES = 8  # each end has save slots of its own (its MAC): a few, not a fleet


def mac_of(end: int) -> str:
    """The MAC of a topology's `end`-th guest's private NIC: fixed, since a save slot's
    MAC cannot change at restore (so each end has save slots of its own)."""
    return f"52:54:00:d7:77:{end:02x}"


def host_of(settings: Settings, roles: Mapping[str, str]) -> str:
    """The one libvirt URI the group runs on, or DevboxError saying why it cannot."""
    uris = settings.uris(roles.values())
    if len(uris) > 1:
        raise DevboxError(
            "a topology's guests run on one libvirt host (their link is on its 127.0.0.1), "
            f"but these distros run on {', '.join(uris)}: put them on one host in "
            "[tool.pytest-devbox.hosts], or use distros of one host"
        )
    uri = uris[0]
    if len(roles) > 2 and not is_local(uri):
        raise DevboxError(
            f"a topology of {len(roles)} roles needs its guests on this host (their hub "
            f"relays frames here), but they run on {uri}: use two roles on a remote host"
        )
    return uri


def check_roles(roles: Mapping[str, str]) -> None:
    """DevboxError unless `roles` ({role: distro}) is a topology this pool can start."""
    if not 2 <= len(roles) <= MAX_ROLES:
        raise DevboxError(
            f"a devbox topology has 2 to {MAX_ROLES} roles (one guest each); "
            f"got {len(roles)}: {', '.join(roles) or 'none'}"
        )
    for role in roles:
        check_role(role)


@contextlib.contextmanager
def topology(pool: Pool, roles: Mapping[str, str]) -> Iterator[dict[str, Machine]]:
    """Fresh guests {role: Machine} of `roles` ({role: distro}, in end order) on a
    private network, each with `.address`; all destroyed at exit (kept as `fresh`
    keeps them: --devbox-keep, or --devbox-keep-failed for a failed test's).

    The devbox_topology fixture's group lives for one test; a fixture of the user's
    own scope gets one from `with topology(devbox_pool, {...}) as group: yield group`.
    """
    roles = {role: canonical(distro, pool.profiles) for role, distro in roles.items()}
    check_roles(roles)
    host_of(pool.settings, roles)
    names = list(roles)
    ports = free_udp_ports(len(names))
    hosts = {role: address_of(end) for end, role in enumerate(names, 1)}
    with contextlib.ExitStack() as stack:
        if len(names) == 2:
            peers = [ports[1], ports[0]]  # each end sends to the other's port
        else:  # the hub is closed last: after the guests that send to it
            peers = [stack.enter_context(Hub(ports)).port] * len(names)
        group: dict[str, Machine] = {}
        for end, role in enumerate(names, 1):
            link = PrivateLink(mac_of(end), ports[end - 1], peers[end - 1])
            pool.log(f"topology: starting {role} ({roles[role]}) at {hosts[role]}")
            group[role] = stack.enter_context(pool.fresh(roles[role], link=link))
        for end, role in enumerate(names, 1):
            join(group[role], mac_of(end), hosts[role], hosts)
        yield group

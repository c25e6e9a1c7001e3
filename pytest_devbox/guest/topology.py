"""A guest's side of a private network (a topology): its second NIC found by its MAC,
given a fixed address, and the other guests' role names in /etc/hosts.

Done over the guest handle after every boot or restore: a save slot is made before any
of it, so one slot serves every topology and every address.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..errors import DevboxError

if TYPE_CHECKING:
    from .machine import Machine

NETWORK = "10.77.0"  # the private network: 10.77.0.N/24, N = 1, 2, ... by end
PREFIX = 24
_ROLE = re.compile(r"[a-z][a-z0-9-]{0,62}")


def address_of(end: int) -> str:
    """The private address of a topology's `end`-th guest (1-based)."""
    return f"{NETWORK}.{end}"


def check_role(role: str) -> str:
    """A role name, or DevboxError: it becomes a host name in every guest's /etc/hosts."""
    if not _ROLE.fullmatch(role):
        raise DevboxError(
            f"topology role {role!r} is not a host name: use lower-case letters, digits "
            "and '-', starting with a letter (server, client, db-1)"
        )
    return role


def join_command(mac: str, address: str, hosts: Mapping[str, str]) -> str:
    """Root's shell command that brings up the NIC with `mac` at `address`/24 and adds
    `hosts` ({name: address}) to /etc/hosts."""
    lines = "".join(f"{ip} {name}\n" for name, ip in sorted(hosts.items()))
    return (
        "set -e; dev=; for d in /sys/class/net/*; do "
        f'[ "$(cat "$d/address")" = {shlex.quote(mac)} ] && dev=${{d##*/}}; done; '
        f'[ -n "$dev" ] || {{ echo "no NIC with MAC {mac}" >&2; exit 3; }}; '
        'ip link set "$dev" up; '
        f'ip addr add {address}/{PREFIX} dev "$dev"; '
        f"printf %s {shlex.quote(lines)} >> /etc/hosts"
    )


def join(machine: Machine, mac: str, address: str, hosts: Mapping[str, str]) -> None:
    """Give `machine` its private address and the role names (CommandFailed if not)."""
    machine.run(join_command(mac, address, hosts), user="root", timeout=60)
    machine.address = address

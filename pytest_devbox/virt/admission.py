"""How many guests fit in their host's memory at once: start what fits, queue the rest.

Every devbox guest asks for its profile's memory (1 GiB by default). Many `devbox_fresh`
guests from xdist workers would otherwise all start, and once they touch their memory
the kernel's OOM killer picks one of them (or the user's browser). Before a guest is
created we count the memory of the devbox guests already running on this libvirt, plus
QEMU's own overhead, against the host's memory (the remote host's for a remote URI)
less a reserve. A guest that does not fit waits, with a line saying so, for other
processes' guests to stop, until its deadline; then NoMemory names the guests holding
the memory. Guests of this very process are never waited for: they stop only when its
own tests end, so it fails at once. A file lock makes the count-then-create step atomic
across processes of one user.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
from filelock import FileLock

from ..errors import DevboxError
from ..host import owner
from ..log import Log
from .domain_xml import NAME_PREFIX, read_metadata
from .qemu_user import is_local

# What QEMU itself needs beside the guest's RAM (TCG's translation cache included).
OVERHEAD_MIB = 256
# Left to the host: the test process, libvirtd, the page cache that image builds want.
RESERVE_FRACTION = 0.15
RESERVE_MIN_MIB = 1024
POLL_SECONDS = 2.0


class NoMemory(DevboxError):
    """A guest does not fit in its host's memory beside the running ones, and will not.
    `own`: because of this process's own guests (which it may still let go of)."""

    def __init__(self, message: str, *, own: bool = False) -> None:
        super().__init__(message)
        self.own = own


@dataclass(frozen=True)
class Holder:
    """A running devbox guest and the memory it counts for (QEMU's overhead included)."""

    name: str
    mib: int
    ours: bool  # started by this very process

    def describe(self) -> str:
        return f"{self.name} ({self.mib} MiB{', this session' if self.ours else ''})"


def meminfo_mib(path: Path = Path("/proc/meminfo")) -> dict[str, int]:
    """/proc/meminfo in MiB by field name."""
    found = {}
    for line in path.read_text().splitlines():
        name, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            found[name] = int(fields[0]) // 1024
    return found


def host_memory_mib(conn: libvirt.virConnect, *, remote: bool) -> int:
    """The memory of the host running `conn`'s guests: this host's, or a remote's as its
    libvirtd reports it (our /proc/meminfo says nothing about another host)."""
    if not remote:
        return meminfo_mib()["MemTotal"]
    try:
        return int(conn.getInfo()[1])
    except libvirt.libvirtError as e:
        raise DevboxError(
            f"cannot read the memory of the libvirt host {conn.getURI()}: "
            f"{e.get_error_message() or e}; check that its libvirtd answers (virsh nodeinfo)"
        ) from e


def budget_mib(total_mib: int) -> int:
    """How much of the host's memory devbox guests may take together."""
    return total_mib - max(RESERVE_MIN_MIB, int(total_mib * RESERVE_FRACTION))


def holders(conn: libvirt.virConnect) -> list[Holder]:
    """The running devbox guests on ``conn``, with what each takes."""
    me = owner.me().token  # the identity the sweep trusts too (host/owner.py)
    found = []
    for virdom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        try:
            name = virdom.name()
            if not name.startswith(NAME_PREFIX):
                continue
            meta = read_metadata(virdom.XMLDesc(0))
            mib = virdom.maxMemory() // 1024 + OVERHEAD_MIB
        except libvirt.libvirtError:
            continue  # gone while we counted
        ours = meta.get("owner") == me
        found.append(Holder(name, mib, ours))
    return sorted(found, key=lambda h: h.name)


def guests_mib(conn: libvirt.virConnect) -> int:
    """Memory of the running devbox guests on ``conn``, QEMU's overhead included."""
    return sum(h.mib for h in holders(conn))


@contextlib.contextmanager
def admitted(
    conn: libvirt.virConnect,
    memory_mib: int,
    lock_path: Path,
    *,
    label: str,
    log: Log,
    timeout: float,
    total_mib: int | None = None,
) -> Iterator[None]:
    """Hold a place for a guest of ``memory_mib`` until the body has created it.

    Waits while the running devbox guests and this one would exceed the budget, at most
    `timeout` seconds (the boot's deadline); a guest alone is always let through (a
    budget smaller than one guest is the user's choice). NoMemory when it does not fit.
    """
    remote = not is_local(conn.getURI())
    total = total_mib if total_mib is not None else host_memory_mib(conn, remote=remote)
    budget = budget_mib(total)
    need = memory_mib + OVERHEAD_MIB
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path))
    deadline = time.monotonic() + timeout
    said = False
    while True:
        lock.acquire()
        found = holders(conn)
        used = sum(h.mib for h in found)
        if used == 0 or used + need <= budget:
            break
        lock.release()
        ours = sum(h.mib for h in found if h.ours)
        fits = f"{label}: a guest of {need} MiB does not fit: " + _held(found, budget, total)
        if ours and ours + need > budget:
            raise NoMemory(
                f"{fits}; those of this session stop only when its tests are done, so "
                "waiting cannot help: give the profile less memory_mib, use its devbox and "
                "devbox_fresh in separate tests, or run fewer distros at once",
                own=True,
            )
        left = deadline - time.monotonic()
        if left <= 0:
            raise NoMemory(
                f"{fits}; waited {timeout:.0f} s for them to stop: stop the guests you no "
                "longer need (devbox ls, devbox destroy NAME) or give the profile less memory_mib"
            )
        if not said:
            log(f"{fits}; it starts when one stops (waiting at most {left:.0f} s)")
            said = True
        time.sleep(min(POLL_SECONDS, left))
    try:
        yield
    finally:
        lock.release()


def _held(found: list[Holder], budget: int, total: int) -> str:
    return (
        f"devbox guests may use {budget} MiB of the host's {total} MiB and "
        f"{sum(h.mib for h in found)} MiB are held by {', '.join(h.describe() for h in found)}"
    )

"""How many guests fit in this host's memory at once: start what fits, queue the rest.

Every devbox guest asks for its profile's memory (1 GiB by default). Many `devbox_fresh`
guests from threads or xdist workers would otherwise all start, and once they touch
their memory the kernel's OOM killer picks one of them (or the user's browser). Before
a guest is created we count the memory of the devbox guests already running on this
libvirt, plus QEMU's own overhead, against the host's memory less a reserve; a guest
that does not fit waits, with a line saying so, until one stops. A file lock makes the
count-then-create step atomic across processes of one user.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
from filelock import FileLock

from .domain_xml import NAME_PREFIX

# What QEMU itself needs beside the guest's RAM (TCG's translation cache included).
OVERHEAD_MIB = 256
# Left to the host: the test process, libvirtd, the page cache that image builds want.
RESERVE_FRACTION = 0.15
RESERVE_MIN_MIB = 1024
POLL_SECONDS = 2.0


def meminfo_mib(path: Path = Path("/proc/meminfo")) -> dict[str, int]:
    """/proc/meminfo in MiB by field name."""
    found = {}
    for line in path.read_text().splitlines():
        name, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            found[name] = int(fields[0]) // 1024
    return found


def budget_mib(total_mib: int) -> int:
    """How much of the host's memory devbox guests may take together."""
    return total_mib - max(RESERVE_MIN_MIB, int(total_mib * RESERVE_FRACTION))


def guests_mib(conn: libvirt.virConnect) -> int:
    """Memory of the running devbox guests on ``conn``, QEMU's overhead included."""
    used = 0
    for virdom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        try:
            if virdom.name().startswith(NAME_PREFIX):
                used += virdom.maxMemory() // 1024 + OVERHEAD_MIB
        except libvirt.libvirtError:
            continue  # gone while we counted
    return used


@contextlib.contextmanager
def admitted(
    conn: libvirt.virConnect,
    memory_mib: int,
    lock_path: Path,
    *,
    label: str,
    log: Callable[[str], None],
    total_mib: int | None = None,
) -> Iterator[None]:
    """Hold a place for a guest of ``memory_mib`` until the body has created it.

    Waits while the running devbox guests and this one would exceed the budget; a guest
    alone is always let through (a budget smaller than one guest is the user's choice).
    """
    total = total_mib if total_mib is not None else meminfo_mib()["MemTotal"]
    budget = budget_mib(total)
    need = memory_mib + OVERHEAD_MIB
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path))
    said = False
    while True:
        lock.acquire()
        used = guests_mib(conn)
        if used == 0 or used + need <= budget:
            break
        lock.release()
        if not said:
            log(
                f"{label}: waiting for memory: running guests take {used} MiB and this one "
                f"needs {need} MiB of the {budget} MiB guests may use; it starts when one stops"
            )
            said = True
        time.sleep(POLL_SECONDS)
    try:
        yield
    finally:
        lock.release()

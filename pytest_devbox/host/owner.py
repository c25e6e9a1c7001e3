"""Who owns a guest, a run dir or a remote volume, and whether that owner is provably dead.

A pid alone names nothing outside its PID namespace, and a hostname is shared by
containers (`--network host`) and by stock client images: neither says whose a guest
is when several containers or client hosts share one libvirtd. An owner token is

    <scope>-<pid>-<start>

where `scope` hashes the kernel's boot id and the owner's PID namespace (unique per
running kernel and namespace), `pid` is its pid there and `start` its start time (field
22 of /proc/PID/stat, in clock ticks since boot: a reused pid has another). An owner is
provably dead only when it ran in our scope and its pid is gone or now belongs to a
later process; any other owner (another container, host or boot) counts as alive.
Run dirs add a lock their owner holds (see guest/sweep.py), which needs no scope.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

_TOKEN = re.compile(r"(?P<scope>[0-9a-f]{12})-(?P<pid>\d+)-(?P<start>\d+)")
TOKEN_PATTERN = _TOKEN.pattern
_PROC = Path("/proc")
_UNKNOWN_SCOPE = "0" * 12  # /proc unreadable: nothing of ours is ever provably dead


@dataclass(frozen=True)
class Owner:
    scope: str
    pid: int
    start: int

    @property
    def token(self) -> str:
        return f"{self.scope}-{self.pid}-{self.start}"


def scope() -> str:
    """12 hex digits naming this kernel boot and our PID namespace."""
    try:
        boot = (_PROC / "sys/kernel/random/boot_id").read_text().strip()
        pidns = os.readlink(_PROC / "self/ns/pid")
    except OSError:
        return _UNKNOWN_SCOPE
    return hashlib.sha256(f"{boot}/{pidns}".encode()).hexdigest()[:12]


def start_time(pid: int) -> int | None:
    """When process `pid` of our namespace started (clock ticks since boot), or None."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
        # The command name (field 2) may hold spaces and parentheses: split after it.
        return int(stat[stat.rindex(")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def me() -> Owner:
    """This process (recomputed after a fork: the child is another owner)."""
    pid = os.getpid()
    return Owner(scope(), pid, start_time(pid) or 0)


def parse(token: str) -> Owner | None:
    m = _TOKEN.fullmatch(token.strip())
    return Owner(m["scope"], int(m["pid"]), int(m["start"])) if m else None


def provably_dead(token: str) -> bool:
    """Whether the owner named by `token` has ended. Unknown, malformed, another
    namespace's, host's or boot's: not provably dead, so alive."""
    owner = parse(token)
    if owner is None or owner.scope != scope() or owner.scope == _UNKNOWN_SCOPE:
        return False
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        pass  # it exists (another user's): its start time tells whether it is ours
    start = start_time(owner.pid)
    # None: /proc hides it (hidepid) although kill saw it; cannot tell, so alive.
    return start is not None and start != owner.start

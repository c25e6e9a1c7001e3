"""The reaper: restored guests go away with the process that restored them, however it goes.

libvirt destroys a *created* domain when its connection closes (AUTODESTROY), but has
no such flag for a *restored* one. So each process that restores guests starts one
small child, `python -m pytest_devbox.guest.reaper URI PID`, in a session of its own (a
terminal's Ctrl-C does not reach it), and tells it through a pipe which domains to
watch. When the pipe closes (a normal exit, Ctrl-C, a crash or kill -9 of the parent
all close it), the reaper destroys every domain still watched whose metadata names the
parent as its owner, deletes its overlay, and exits. The owner check matters: a restore
slot's name is reused by the next guest restored from it, perhaps by another process.

What the reaper cannot cover (it was itself killed, or the host lost power) the sweep
at the next session start does, from the same owner metadata.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import libvirt

from ..errors import DomainError
from ..virt import domain as dom
from ..virt import domain_xml


class Reaper:
    """The parent's end: one reaper process per (process, libvirt URI), started lazily."""

    _running: ClassVar[dict[tuple[int, str], Reaper]] = {}

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "pytest_devbox.guest.reaper", uri, str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        # Wait until it ignores SIGINT and reads the pipe: a guest is never watched by
        # a reaper that could not start.
        assert self._proc.stdout is not None
        ready = self._proc.stdout.readline()
        self._proc.stdout.close()
        if ready != b"ready\n":
            self._proc.kill()
            self._proc.wait()
            raise DomainError(
                f"the reaper process (python -m pytest_devbox.guest.reaper) did not start: exit "
                f"status {self._proc.returncode}; without it a restored guest could outlive "
                "its session"
            )

    @classmethod
    def for_uri(cls, uri: str) -> Reaper:
        key = (os.getpid(), uri)  # a forked child needs a reaper of its own
        reaper = cls._running.get(key)
        if reaper is None or reaper._proc.poll() is not None:
            reaper = cls._running[key] = cls(uri)
        return reaper

    def _send(self, verb: str, name: str) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.write(f"{verb} {name}\n".encode())
        self._proc.stdin.flush()

    def watch(self, name: str) -> None:
        """Destroy domain `name` if this process ends while it runs. Call it before the
        domain starts, so no moment exists when the guest runs unwatched."""
        try:
            self._send("watch", name)
        except OSError as e:
            raise DomainError(
                f"the reaper process (pid {self._proc.pid}) is gone ({e}): without it a "
                "restored guest could outlive this session"
            ) from e

    def forget(self, name: str) -> None:
        """`name` was destroyed by us: nothing left to do for it."""
        with contextlib.suppress(OSError):  # no reaper: nothing to forget
            self._send("forget", name)

    def stop(self) -> None:
        """Close the pipe and wait: the reaper destroys what is still watched."""
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        self._proc.wait(timeout=60)
        Reaper._running.pop((os.getpid(), self.uri), None)


def reap(conn: libvirt.virConnect, owner_pid: str, names: set[str]) -> list[str]:
    """Destroy each of `names` that still runs on behalf of `owner_pid`; what it did."""
    done: list[str] = []
    for name in sorted(names):
        try:
            virdom = conn.lookupByName(name)
            meta = domain_xml.read_metadata(virdom.XMLDesc(0))
            if meta.get("owner_pid") != owner_pid:
                continue  # the slot's next guest, someone else's
            virdom.destroy()
        except libvirt.libvirtError:
            continue  # gone already
        if meta.get("overlay"):
            Path(meta["overlay"]).unlink(missing_ok=True)
        done.append(name)
    return done


def main(argv: list[str]) -> int:
    uri, owner_pid = argv[1], argv[2]
    # Ctrl-C and a closing terminal are for the parent: we act when its pipe closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    print("ready", flush=True)
    # Our parent stops reading now: nothing more goes to that pipe.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    names: set[str] = set()
    for raw in sys.stdin.buffer:
        verb, _, name = raw.decode().strip().partition(" ")
        if verb == "watch":
            names.add(name)
        elif verb == "forget":
            names.discard(name)
    if not names:
        return 0
    conn = dom.connect(uri)
    try:
        reap(conn, owner_pid, names)
    finally:
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

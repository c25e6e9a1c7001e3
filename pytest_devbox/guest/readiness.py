"""Readiness of a booting guest: one deadline, one polling helper, one function a phase.

The phases run in order: the domain is running, SSH is forwarded, sshd sends its banner,
our key is accepted, /code is mounted (a guest whose share is "sync" has no /code to
mount: its files are copied over SSH once it is up, by guest/sync.py). Whatever phase the
deadline runs out in, the error is a `BootTimeout` naming that phase with the tail of
the serial console (the pool retries those); a guest that stops meanwhile is a
`GuestDied` at once, not after the deadline. The SSH connection is closed on any
failure, so nothing half-open leaks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ..errors import BootTimeout, CommandTimeout, GuestDied, HostKeyMismatch, SSHError
from ..transport.ssh import Connection, probe_banner
from ..virt import domain as dom

T = TypeVar("T")
# What a phase may meet while the guest is still coming up; anything else is final.
TRANSIENT_SSH: tuple[type[BaseException], ...] = (OSError, EOFError, SSHError)
CONSOLE_LINES = 40
# fstab has /code with nofail, so a boot that did not mount it still comes up: mount it,
# as the share says (an image made for virtiofs may get 9p: config/code_ids.py).
MOUNT_CODE = "mountpoint -q /code || mount -t {fs} -o {options} /code /code"
_MOUNT_OPTIONS = {"virtiofs": "defaults", "9p": "trans=virtio,version=9p2000.L,msize=262144"}
SHARE_PROBE = "grep -qw {fs} /proc/filesystems || modprobe -n {module} 2>/dev/null"
_SHARE_MODULES = {"virtiofs": "virtiofs", "9p": "9pnet_virtio"}


class Deadline:
    """A point in time that every phase of one boot shares."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._end = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self._end - time.monotonic())

    def expired(self) -> bool:
        return self.remaining() <= 0.0

    def cap(self, seconds: float, floor: float = 1.0) -> float:
        """``seconds``, but no later than the deadline (and at least ``floor``)."""
        return max(floor, min(seconds, self.remaining()))


@dataclass
class Boot:
    """One guest on its way up: what every phase needs to wait and to explain itself."""

    domain: dom.Domain
    distro: str
    console: Path
    deadline: Deadline
    tail: Callable[[Path, int], str]

    def check_alive(self, phase: str) -> None:
        state = self.domain.state()
        if state != "running":
            raise GuestDied(
                f"{self.distro}: the guest stopped while booting (state {state}) "
                f"in phase {phase!r}",
                phase=phase,
                console_tail=self.tail(self.console, CONSOLE_LINES),
            )

    def timeout(self, phase: str, seen: str = "") -> BootTimeout:
        detail = f" (last seen: {seen})" if seen else ""
        return BootTimeout(
            f"{self.distro}: the guest did not get to {phase!r} within "
            f"{self.deadline.seconds:.0f} s{detail}; see the console below, or raise the "
            "timeout (slow host, software emulation)",
            phase=phase,
            console_tail=self.tail(self.console, CONSOLE_LINES),
        )

    def poll(
        self,
        phase: str,
        attempt: Callable[[], T | None],
        *,
        interval: float,
        transient: tuple[type[BaseException], ...] = (),
        final: tuple[type[BaseException], ...] = (),
    ) -> T:
        """Call ``attempt`` until it returns a value; between tries check the guest is
        alive and the deadline. ``transient`` errors count as "not yet", unless they are
        also ``final``."""
        seen = ""
        while True:
            try:
                value = attempt()
            except final:
                raise
            except transient as e:
                value, seen = None, f"{type(e).__name__}: {e}"
            if value is not None:
                return value
            self.check_alive(phase)
            if self.deadline.expired():
                raise self.timeout(phase, seen)
            time.sleep(min(interval, self.deadline.remaining()))


def wait_ready(
    boot: Boot,
    *,
    connection: Callable[[int], Connection],
    share: str,
    probe: Callable[[str, int, float], bool] = probe_banner,
) -> Connection:
    """Run every phase; return the connected SSH connection with /code mounted (with
    share "sync", /code is left to the copy that follows). ``probe`` looks for the
    banner (a remote site's goes through its tunnel)."""
    boot.check_alive("running")
    port = boot.domain.forward_port(22)
    wait_banner(boot, port, probe)
    ssh = connection(port)
    try:
        authenticate(boot, ssh)
        if share != "sync":
            mount_code(boot, ssh, share)
    except BaseException:
        ssh.close()
        raise
    return ssh


def wait_banner(
    boot: Boot, port: int, probe: Callable[[str, int, float], bool] = probe_banner
) -> None:
    """sshd answers on the forwarded port (QEMU accepts before the guest listens)."""

    def banner() -> bool | None:
        return probe("127.0.0.1", port, boot.deadline.cap(2.0)) or None

    boot.poll("ssh banner", banner, interval=0.25)


def authenticate(boot: Boot, ssh: Connection) -> None:
    """Our key is accepted; a changed host key is final, not something to wait out."""

    def connect() -> bool:
        ssh.connect(timeout=boot.deadline.cap(15.0))
        return True

    boot.poll("auth", connect, interval=1.0, transient=TRANSIENT_SSH, final=(HostKeyMismatch,))


def mount_code(boot: Boot, ssh: Connection, share: str) -> None:
    """/code is mounted (fstab has it with nofail, so we mount it if boot did not)."""
    last = [""]

    def mounted() -> bool | None:
        r = ssh.run(
            MOUNT_CODE.format(fs=share, options=_MOUNT_OPTIONS[share]),
            check=False,
            cwd=None,
            timeout=boot.deadline.cap(30.0),
        )
        last[0] = r.stderr.strip()
        return True if r.ok else None

    try:
        boot.poll("/code mounted", mounted, interval=1.0, transient=(CommandTimeout,))
    except BootTimeout as e:
        raise BootTimeout(
            f"{boot.distro}: /code is not mounted in the guest: {last[0] or e}\n"
            + share_diagnosis(ssh, share),
            phase=e.phase,
            console_tail=e.console_tail,
        ) from None


def share_diagnosis(ssh: Connection, share: str) -> str:
    """Whether the guest kernel offers the share's filesystem, and what to change."""
    fs = "9p" if share == "9p" else "virtiofs"
    try:
        r = ssh.run(
            SHARE_PROBE.format(fs=fs, module=_SHARE_MODULES[fs]), check=False, cwd=None, timeout=10
        )
        offered = "offers" if r.ok else "does not offer"
    except (SSHError, CommandTimeout):
        offered = "may not offer (the check could not run)"
    return (
        f"The profile shares /code with {share}; the guest kernel {offered} {fs} "
        "(/proc/filesystems or its module). Change the profile's `share` field "
        '(for example share = "9p" for kernels older than 5.4) or its image.'
    )

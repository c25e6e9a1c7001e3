"""A session's settings and their defaults, in a module light enough for the plugin to
import on every run (no libvirt, no paramiko). Every default lives here, once."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..host.layout import default_cache_dir

# The system daemon: the one URI where virtiofs works before libvirt 10.0.
SYSTEM_URI = "qemu:///system"
DEFAULT_URI = SYSTEM_URI
DEFAULT_ACCEL = "auto"
# What a user may ask for; `auto` resolves to kvm or tcg (host.resolve_accel).
ACCEL_CHOICES = ("auto", "kvm", "tcg")
# Who runs QEMU for a guest: the calling user, or libvirt's configured user (virt/qemu_user.py).
QEMU_USER_CHOICES = ("caller", "libvirt")
DEFAULT_QEMU_USER = "caller"
# auto: restore guests of 9p profiles from a saved booted guest, boot the rest.
RESTORE_CHOICES = ("auto", "off")
# auto: commands run through a resident executor in the guest where it has a Python 3;
# ssh: one SSH exec channel per command.
EXEC_CHOICES = ("auto", "ssh")
DEFAULT_EXEC = "auto"
# Our storage pool's directory on a remote libvirt host (virt/volumes.py): images uploaded
# there once, guests' overlays and consoles. Never the local cache dir.
DEFAULT_REMOTE_POOL = "/var/lib/pytest-devbox/pool"
# How /code reaches a guest: a share of the host directory (virtiofs, 9p), or a copy
# (sync: tar over SSH, no shared file system; guest/sync.py). Each profile names its own.
SHARE_CHOICES = ("virtiofs", "9p", "sync")
# The unprivileged user every image has (with the caller's uid and gid), who runs the
# commands of tests unless they ask for root.
GUEST_USER = "devbox"
# Whose ids what the guest writes in /code gets on the host (code_ids.py): auto keeps guest
# root from being host root there; passthrough is the explicit opt-in to the old sharing.
CODE_IDS_CHOICES = ("auto", "passthrough")
DEFAULT_CODE_IDS = "auto"


@dataclass(frozen=True)
class Settings:
    """Everything a session decides once: where, how and with what guests run."""

    uri: str = DEFAULT_URI
    cache_dir: Path = field(default_factory=default_cache_dir)
    code_dir: Path = field(default_factory=Path.cwd)
    accel: str = DEFAULT_ACCEL
    qemu_user: str = DEFAULT_QEMU_USER
    rebuild: bool = False
    keep: bool = False
    keep_failed: bool = False  # leave the guests of a failed test running
    reuse: bool = False  # use guests `devbox up` started, and leave them up
    offline: bool = False
    repos: tuple[str, ...] = ()
    boot_timeout: float | None = None
    boot_retries: int = 1
    restore: str = "auto"
    eager: bool = False  # start every selected distro's shared guest at session start
    artifacts_dir: Path | None = None  # where a failed test's guests leave their logs
    exec_mode: str = DEFAULT_EXEC
    remote_pool: str = DEFAULT_REMOTE_POOL  # our pool's directory on a remote libvirt host
    # The project's [tool.pytest-devbox.hosts]: (distro or "*", URI) pairs (hosts.py).
    hosts: tuple[tuple[str, str], ...] = ()
    rootdir: Path | None = None  # the project's (pytest's rootdir): recorded in its images

    def uri_for(self, distro: str) -> str:
        """The libvirt URI of the host that runs ``distro`` (hosts, else ``uri``)."""
        table = dict(self.hosts)
        return table.get(distro) or table.get("*") or self.uri

    def uris(self, distros: Iterable[str]) -> list[str]:
        """The distinct URIs ``distros`` run on, in first-use order."""
        return list(dict.fromkeys(self.uri_for(d) for d in distros))

    share: str = ""  # every guest's share instead of its profile's; "": each profile's own
    sync_exclude: tuple[str, ...] = ()  # gitignore-style patterns a sync does not copy
    code_ids: str = DEFAULT_CODE_IDS  # auto (guest root is not host root) or passthrough

"""Where a guest's files live and how its SSH port is reached: this host, or a remote
libvirt host (remote.py, volumes.py). A boot asks its site for an overlay and a console
file, a banner probe and an SSH connection, and never tests which site it has.

On this host the overlay and console are files in the session's run dir and the port is
on our own loopback. On a remote host they are volumes in our storage pool there (the
image uploaded once) and the port is on the remote loopback, reached through a tunnel.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Protocol

import libvirt

from . import qemu_img, volumes
from .images import image_lock
from .launch import Log, Plan, tail_file, tail_text
from .remote import RemoteHost, Tunnel, jump_options, parse_uri
from .ssh import Connection, probe_banner

REMOTE_SHARE = "sync"


class GuestFiles(Protocol):
    """One guest's overlay and console, on whichever host runs its QEMU."""

    overlay: Path
    console: Path

    def tail(self, lines: int) -> str: ...

    def tail_of(self, _console: Path, lines: int) -> str:
        """`tail` in the shape boot.Boot calls it."""
        ...

    def remove(self) -> None: ...


@dataclasses.dataclass
class LocalFiles:
    overlay: Path
    console: Path

    def tail(self, lines: int) -> str:
        return tail_file(self.console, lines)

    def tail_of(self, _console: Path, lines: int) -> str:
        return self.tail(lines)

    def remove(self) -> None:
        self.overlay.unlink(missing_ok=True)


@dataclasses.dataclass
class RemoteFiles:
    overlay: Path
    console: Path
    virconn: libvirt.virConnect
    pool: libvirt.virStoragePool

    def tail(self, lines: int) -> str:
        return tail_text(volumes.read_tail(self.virconn, self.pool, self.console.name), lines)

    def tail_of(self, _console: Path, lines: int) -> str:
        return self.tail(lines)

    def remove(self) -> None:
        for path in (self.overlay, self.console):
            volumes.delete(self.pool, path.name)


class Site:
    """This host: the overlay next to the session's other files, SSH on our loopback."""

    remote: RemoteHost | None = None

    def __init__(self, plan: Plan) -> None:
        self.plan = plan

    def adapt(self, plan: Plan, log: Log) -> Plan:
        """The plan as this site can run it."""
        return plan

    def files(self, name: str) -> GuestFiles:
        overlay = self.plan.workdir / f"{name}.qcow2"
        self.plan.cache.overlay(self.plan.image.path, overlay)
        return LocalFiles(overlay, self.plan.workdir / f"{name}.console.log")

    def probe(self, host: str, port: int, timeout: float) -> bool:
        return probe_banner(host, port, timeout)

    def connection(self, port: int) -> Connection:
        return self.plan.connection(port)

    def close(self) -> None:
        """Nothing to close on this host."""


class RemoteSite(Site):
    """A remote libvirt host: volumes in our pool there, SSH through a tunnel."""

    def __init__(
        self, plan: Plan, remote: RemoteHost, virconn: libvirt.virConnect, pool_dir: str, log: Log
    ) -> None:
        super().__init__(plan)
        self.remote = remote
        self.virconn = virconn
        self.pool = volumes.ensure_pool(virconn, pool_dir)
        image = plan.image.path
        upload = volumes.Upload(
            path=image,
            name=volumes.image_volume(image, str(plan.image.metadata.get("built_at", ""))),
            capacity=qemu_img.virtual_size(image),
            lock=image_lock(image),
        )
        self.base = volumes.upload_image(virconn, self.pool, upload, log)
        self.tunnel = Tunnel(remote)

    def adapt(self, plan: Plan, log: Log) -> Plan:
        # The one place a remote URI means sync: a directory of this host cannot be
        # mounted on another host.
        if plan.share != REMOTE_SHARE:
            where = self.remote.describe() if self.remote else "the remote host"
            log(
                f"{plan.profile.name}: /code is copied into the guest (share "
                f"{REMOTE_SHARE!r}, not {plan.share!r}): {where} cannot mount a directory "
                "of this host"
            )
        return dataclasses.replace(plan, share=REMOTE_SHARE)

    def files(self, name: str) -> GuestFiles:
        vol = volumes.overlay(self.pool, self.base, volumes.guest_volume(name, volumes.OVERLAY))
        root = Path(volumes.pool_path(self.pool))
        console = root / volumes.guest_volume(name, volumes.CONSOLE)
        return RemoteFiles(Path(vol.path()), console, self.virconn, self.pool)

    def probe(self, host: str, port: int, timeout: float) -> bool:
        # `host` is 127.0.0.1: the remote host's own loopback, seen through the tunnel.
        return self.tunnel.probe_banner(port, timeout)

    def connection(self, port: int) -> Connection:
        assert self.remote is not None
        return self.plan.connection(
            port,
            opener=lambda timeout: self.tunnel.open(port, timeout),
            via=jump_options(self.remote),
        )

    def close(self) -> None:
        self.tunnel.close()


def site_for(plan: Plan, uri: str, virconn: libvirt.virConnect, pool_dir: str, log: Log) -> Site:
    remote = parse_uri(uri)
    if remote is None:
        return Site(plan)
    return RemoteSite(plan, remote, virconn, pool_dir, log)

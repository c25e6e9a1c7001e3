"""Where a guest's files live and how its SSH port is reached: this host, or a remote
libvirt host (transport/tunnel.py, virt/volumes.py). A boot asks its site for an overlay
and a console file, a banner probe and an SSH connection, and never tests which site it
has.

On this host the overlay and console are files in the session's run dir and the port is
on our own loopback. On a remote host they are volumes in our storage pool there (the
image uploaded once) and the port is on the remote loopback, reached through a tunnel.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Protocol

import libvirt

from ..image import qemu_img
from ..image.cache import image_lock
from ..log import Log
from ..transport.ssh import Connection, probe_banner
from ..transport.tunnel import RemoteHost, Tunnel, jump_options, parse_uri
from ..virt import volumes
from .plan import Plan, guest_connection, host_key_alias, tail_file, tail_text

REMOTE_SHARE = "sync"


class GuestFiles(Protocol):
    """One guest's overlay and console, on whichever host runs its QEMU."""

    overlay: Path
    console: Path

    def tail(self, lines: int) -> str: ...

    def remove(self) -> None: ...


@dataclasses.dataclass
class LocalFiles:
    overlay: Path
    console: Path

    def tail(self, lines: int) -> str:
        return tail_file(self.console, lines)

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

    def remove(self) -> None:
        for path in (self.overlay, self.console):
            volumes.delete(self.pool, path.name)


class Link:
    """How this process reaches the SSH ports forwarded on 127.0.0.1 of the host a libvirt
    URI runs guests on: our own loopback, or the remote host's through one tunnel.

    A guest being started (its Site) and a process attaching to a running guest (an
    xdist worker, --devbox-reuse, `devbox run` on a kept sync guest: guest/attach.py) use this
    same class, so the ways they reach a guest cannot drift apart.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.remote: RemoteHost | None = parse_uri(uri)
        self.tunnel = Tunnel(self.remote) if self.remote else None

    def probe(self, host: str, port: int, timeout: float) -> bool:
        if self.tunnel is None:
            return probe_banner(host, port, timeout)
        # `host` is 127.0.0.1: the remote host's own loopback, seen through the tunnel.
        return self.tunnel.probe_banner(port, timeout)

    def connection(
        self, cache_root: Path, port: int, alias: str, *, username: str = "root"
    ) -> Connection:
        """A guest's SSH connection on `port` (not yet connected), its host key pinned
        under `alias`."""
        tunnel, remote = self.tunnel, self.remote
        if tunnel is None or remote is None:
            return guest_connection(cache_root, port, alias, username=username)
        return guest_connection(
            cache_root,
            port,
            alias,
            username=username,
            opener=lambda timeout: tunnel.open(port, timeout),
            via=jump_options(remote),
        )

    def close(self) -> None:
        if self.tunnel is not None:
            self.tunnel.close()


class Reach(Protocol):
    """What a Machine keeps of how it reaches its guest: a Site or a Link."""

    @property
    def remote(self) -> RemoteHost | None: ...

    def close(self) -> None: ...


class Site:
    """This host: the overlay next to the session's other files, SSH on our loopback."""

    def __init__(self, plan: Plan, link: Link) -> None:
        self.plan = plan
        self.link = link

    @property
    def remote(self) -> RemoteHost | None:
        return self.link.remote

    def adapt(self, plan: Plan, log: Log) -> Plan:
        """The plan as this site can run it."""
        return plan

    def files(self, name: str) -> GuestFiles:
        overlay = self.plan.workdir / f"{name}.qcow2"
        self.plan.cache.overlay(self.plan.image.path, overlay)
        return LocalFiles(overlay, self.plan.workdir / f"{name}.console.log")

    def probe(self, host: str, port: int, timeout: float) -> bool:
        return self.link.probe(host, port, timeout)

    def connection(self, port: int) -> Connection:
        return self.link.connection(self.plan.cache.root, port, host_key_alias(self.plan.image))

    def close(self) -> None:
        self.link.close()


class RemoteSite(Site):
    """A remote libvirt host: volumes in our pool there, SSH through a tunnel."""

    def __init__(
        self, plan: Plan, link: Link, virconn: libvirt.virConnect, pool_dir: str, log: Log
    ) -> None:
        super().__init__(plan, link)
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


def site_for(plan: Plan, uri: str, virconn: libvirt.virConnect, pool_dir: str, log: Log) -> Site:
    link = Link(uri)
    if link.remote is None:
        return Site(plan, link)
    return RemoteSite(plan, link, virconn, pool_dir, log)

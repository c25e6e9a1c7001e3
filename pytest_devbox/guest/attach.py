"""Attaching to a guest another process started: a pytest-xdist worker to its
controller's shared guest (plugin/broker.py), a session to the guest `devbox up` left running
(pool/reuse.py).

One way for both, and the same as the pool's own guests: the domain is looked up at the
URI of the host it runs on (the distro's, which the hosts map may choose), and its SSH
port is reached through that host's sites.Link (our loopback, or the remote host's
through a tunnel). The Machine made here only detaches: the guest is not ours.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import libvirt

from ..config.profiles import Profile
from ..config.settings import Settings
from ..errors import DevboxError
from ..image.cache import ImageInfo
from ..log import Log
from ..virt import domain as dom
from ..virt import domain_xml
from .machine import Machine
from .parts import GuestParts
from .plan import host_key_alias
from .sites import Link, LocalFiles


@dataclass(frozen=True)
class Running:
    """Where a running guest is, as another process needs it to attach."""

    name: str
    uri: str  # the libvirt URI of the host running it
    port: int  # its SSH port, forwarded on 127.0.0.1 of that host
    overlay: str = ""
    console_log: str = ""
    # How /code reaches it, for guests whose domain does not record it (older ones).
    share: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Running:
        return cls(
            name=str(data["name"]),
            uri=str(data["uri"]),
            port=int(data["port"]),
            overlay=str(data.get("overlay", "")),
            console_log=str(data.get("console_log", "")),
            share=str(data.get("share", "")),
        )


Check = Callable[[Mapping[str, str]], None]  # raises when the guest's metadata won't do


def attach(
    guest: Running,
    profile: Profile,
    image: ImageInfo,
    settings: Settings,
    *,
    whose: str,
    check: Check | None = None,
    boot_seconds: float = 0.0,
    log: Log = print,
) -> Machine:
    """A Machine on the running `guest` of `profile`, logged in as root; `detach()` it,
    which leaves the guest to its owner. `whose` names the owner in errors ("the
    controller's guest"); `check` vets the domain's devbox metadata before logging in."""
    virconn = dom.connect(guest.uri)
    link: Link | None = None
    try:
        domain = dom.Domain(virconn.lookupByName(guest.name))
        metadata = domain_xml.read_metadata(domain.virdom.XMLDesc(0))
        if check is not None:
            check(metadata)
        link = Link(guest.uri)
        ssh = link.connection(settings.cache_dir, guest.port, host_key_alias(image))
        ssh.connect(timeout=60.0)
    except libvirt.libvirtError as e:
        _close(virconn, link)
        raise DevboxError(f"{whose} {guest.name} is gone: {e}") from e
    except BaseException:
        _close(virconn, link)
        raise
    parts = GuestParts(
        profile=profile,
        image=image,
        virconn=virconn,
        domain=domain,
        ssh=ssh,
        files=LocalFiles(Path(guest.overlay), Path(guest.console_log)),
        # A sync guest's copy was made by its owner; sync() reads what was copied from
        # the guest itself (guest/sync.py), so this process's syncs send only what changed.
        share=metadata.get("share") or guest.share or profile.share,
        code_dir=settings.code_dir,
        site=link,
    )
    machine = Machine(
        parts, exec_mode=settings.exec_mode, log=log, sync_exclude=settings.sync_exclude
    )
    machine.boot_seconds = boot_seconds
    return machine


def _close(virconn: libvirt.virConnect, link: Link | None) -> None:
    if link is not None:
        link.close()
    with contextlib.suppress(libvirt.libvirtError):
        virconn.close()

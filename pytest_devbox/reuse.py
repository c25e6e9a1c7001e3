"""--devbox-reuse: the edit-run loop. A session uses the guest `devbox up` started for
the same profile and code dir instead of booting one, and leaves it running.

Such a guest is not pristine (earlier runs may have changed it): the log and the summary
say it was reused. Without the option a session never touches guests of `devbox up`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt

from . import domain as dom
from . import kept
from .distros import Profile
from .errors import DevboxError
from .images import ImageCache
from .keys import ensure_keypair
from .launch import host_key_alias
from .logins import GUEST_USER
from .machine import Machine
from .paths import CacheLayout
from .settings import Settings
from .ssh import Connection


def find(
    settings: Settings, profile: Profile, warn: Callable[[str], None]
) -> kept.KeptGuest | None:
    """The running `devbox up` guest of ``profile`` sharing this session's code dir."""
    guests = kept.load_all(settings.cache_dir, kept.running_names, warn)
    # The newest of `devbox up`'s guests (a failed test's kept guest is evidence).
    guest = {g.distro: g for g in guests if not g.failed}.get(profile.name)
    if guest is None or guest.uri != settings.uri or not guest.port:
        return None
    if Path(guest.code_dir or "/nonexistent").resolve() != settings.code_dir.resolve():
        return None  # another project's /code: not this session's guest
    return guest


def attach(
    guest: kept.KeptGuest,
    profile: Profile,
    cache: ImageCache,
    settings: Settings,
    log: Callable[[str], None] = print,
) -> Machine:
    """A Machine on ``guest``; `detach()` it at the end, which leaves the guest running."""
    image = cache.image_for(profile)
    layout = CacheLayout(cache.root)
    virconn = dom.connect(settings.uri)
    try:
        domain = dom.Domain(virconn.lookupByName(guest.name))
        metadata = dom.read_metadata(domain.virdom.XMLDesc(0))
        built_from = metadata.get("image_key")
        if built_from != image.key:
            raise DevboxError(
                f"{guest.name} runs on image {built_from}, not the current {image.key} of "
                f"{profile.name}: `devbox rebuild {profile.name}`, or drop --devbox-reuse"
            )
        ssh = Connection(
            "127.0.0.1",
            int(guest.port),
            key_path=ensure_keypair(layout.ssh),
            known_hosts=layout.known_hosts,
            host_key_alias=host_key_alias(image),
        )
        ssh.connect(timeout=60.0)
    except libvirt.libvirtError as e:
        virconn.close()
        raise DevboxError(f"the guest {guest.name} of `devbox up` is gone: {e}") from e
    except BaseException:
        virconn.close()
        raise
    overlay = Path(guest.overlay)
    machine = Machine(
        profile=profile,
        image=image,
        virconn=virconn,
        domain=domain,
        ssh=ssh,
        overlay=overlay,
        console_log=overlay.with_name(f"{guest.name}.console.log"),
        boot_seconds=0.0,
        exec_mode=settings.exec_mode,
        log=log,
        # Guests started before the share was recorded shared /code the profile's way.
        share=metadata.get("share", profile.share),
        code_dir=settings.code_dir,
        sync_exclude=settings.sync_exclude,
    )
    try:
        # A copy is as old as the last sync: bring it up to date, as a share would be.
        machine.sync()
    except BaseException:
        machine.detach()
        raise
    return machine


@contextlib.contextmanager
def login(guest: kept.KeptGuest, cache_dir: Path) -> Iterator[Connection]:
    """The guest user's SSH connection to a kept guest, reached the way its recorded
    ssh line reaches it (host, port, pinned host key alias), closed at the end."""
    alias = [a.partition("=")[2] for a in guest.ssh if a.startswith("HostKeyAlias=")]
    if not alias or not guest.port:
        raise DevboxError(f"the record of {guest.name} has no usable ssh line: {guest.ssh}")
    layout = CacheLayout(cache_dir)
    conn = Connection(
        guest.ssh[-1].rpartition("@")[2],
        int(guest.port),
        username=GUEST_USER,
        key_path=ensure_keypair(layout.ssh),
        known_hosts=layout.known_hosts,
        host_key_alias=alias[0],
    )
    try:
        conn.connect(timeout=60.0)
        yield conn
    finally:
        conn.close()

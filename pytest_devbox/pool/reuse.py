"""--devbox-reuse: the edit-run loop. A session uses the guest `devbox up` started for
the same profile and code dir instead of booting one, and leaves it running.

Such a guest is not pristine (earlier runs may have changed it): the log and the summary
say it was reused. Without the option a session never touches guests of `devbox up`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path

from ..config.profiles import Profile
from ..config.settings import GUEST_USER, Settings
from ..errors import DevboxError
from ..guest.attach import Running
from ..guest.attach import attach as attach_running
from ..guest.machine import Machine
from ..guest.sites import Link
from ..image.cache import ImageCache
from ..log import Log
from ..transport.ssh import Connection
from . import kept


def find(settings: Settings, profile: Profile, warn: Log) -> kept.KeptGuest | None:
    """The running `devbox up` guest of ``profile`` sharing this session's code dir."""
    guests = kept.load_all(settings.cache_dir, kept.running_names, warn)
    # The newest of `devbox up`'s guests (a failed test's kept guest is evidence).
    guest = {g.distro: g for g in guests if not g.failed}.get(profile.name)
    if guest is None or guest.uri != settings.uri_for(profile.name) or not guest.port:
        return None
    if Path(guest.code_dir or "/nonexistent").resolve() != settings.code_dir.resolve():
        return None  # another project's /code: not this session's guest
    return guest


def attach(
    guest: kept.KeptGuest,
    profile: Profile,
    cache: ImageCache,
    settings: Settings,
    log: Log = print,
) -> Machine:
    """A Machine on ``guest`` (on the host its record names); `detach()` it at the end,
    which leaves the guest running."""
    image = cache.image_for(profile)

    def same_image(metadata: Mapping[str, str]) -> None:
        built_from = metadata.get("image_key")
        if built_from != image.key:
            raise DevboxError(
                f"{guest.name} runs on image {built_from}, not the current {image.key} of "
                f"{profile.name}: `devbox rebuild {profile.name}`, or drop --devbox-reuse"
            )

    overlay = Path(guest.overlay)
    where = Running(
        name=guest.name,
        uri=guest.uri,
        port=int(guest.port),
        overlay=guest.overlay,
        console_log=str(overlay.with_name(f"{guest.name}.console.log")),
        # Guests started before the share was recorded shared /code the profile's way.
        share=guest.share,
    )
    machine = attach_running(
        where, profile, image, settings, whose="the guest of `devbox up`", check=same_image, log=log
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
    """The guest user's SSH connection to a kept guest, reached on the host its record
    names (sites.Link: through the tunnel for a remote one) with the host key alias of
    its ssh line; closed at the end."""
    alias = [a.partition("=")[2] for a in guest.ssh if a.startswith("HostKeyAlias=")]
    if not alias or not guest.port:
        raise DevboxError(f"the record of {guest.name} has no usable ssh line: {guest.ssh}")
    link = Link(guest.uri)
    conn = link.connection(cache_dir, int(guest.port), alias[0], username=GUEST_USER)
    try:
        conn.connect(timeout=60.0)
        yield conn
    finally:
        conn.close()
        link.close()

"""What a running guest is made of: the handle (`Machine`) holds one of these, whether
the guest was booted or restored here (boot.py) or is attached to (attach.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import libvirt

from ..config.profiles import Profile
from ..image.cache import ImageInfo
from ..transport.ssh import Connection
from ..virt import domain as dom
from .reaper import Reaper
from .restore import Restored
from .sites import GuestFiles, Reach


@dataclass
class GuestParts:
    profile: Profile
    image: ImageInfo
    virconn: libvirt.virConnect
    domain: dom.Domain
    ssh: Connection  # root's, connected
    files: GuestFiles  # its overlay and console, on the host that runs it
    share: str  # how /code reaches it: "virtiofs" or "9p" (shared) or "sync" (a copy)
    code_dir: Path | None = None  # what a sync guest's /code copies
    accel: str = ""
    site: Reach | None = None  # how it is reached; None: this host's loopback
    reaper: Reaper | None = None  # watches a keepable guest until kept or destroyed
    restored: Restored | None = None  # the save slot it came from
    keepable: bool = False  # started without AUTODESTROY: `keep()` may leave it up
    began: float = 0.0  # time.monotonic() when its start began

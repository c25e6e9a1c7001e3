"""The cache layout: every path under the cache directory, named in one place.

<root>/images/<distro>-<key>.qcow2   cached base images (+ .json metadata, .lock)
<root>/recipes/                      commands files handed to virt-builder
<root>/virt-builder-config/<digest>/ virt-builder config dirs (our repos only)
<root>/virt-builder-cache/           virt-builder's template download cache
<root>/templates/                    local Debian templates and their index
<root>/downloads/                    vendors' cloud images, verified before import
<root>/ssh/                          the key pair and pinned host keys
<root>/run/<run id>/                 one session's overlays and console logs
<root>/kept/                         records of guests kept past their session
<root>/saves/<distro>-<key>/<slot>/  saved running guests (restore slots): state + disk
<root>/saves/cache-id                this cache's random id, made once (in slot names)
<root>/reaper.log                    what reapers could not do (guest/reaper.py)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def default_cache_dir() -> Path:
    """Where images, keys and templates live: shared by every project of this user."""
    override = os.environ.get("PYTEST_DEVBOX_CACHE")
    if override:
        return Path(override)
    if os.geteuid() == 0:
        return Path("/var/cache/pytest-devbox")
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "pytest-devbox"


@dataclass(frozen=True)
class CacheLayout:
    """Paths under one cache directory; computing one creates nothing."""

    root: Path

    @property
    def images(self) -> Path:
        return self.root / "images"

    def image(self, distro: str, key: str) -> Path:
        return self.images / f"{distro}-{key}.qcow2"

    @property
    def recipes(self) -> Path:
        return self.root / "recipes"

    def commands_file(self, distro: str, key: str) -> Path:
        return self.recipes / f"{distro}-{key}.commands"

    @property
    def builder_config(self) -> Path:
        return self.root / "virt-builder-config"

    @property
    def builder_cache(self) -> Path:
        return self.root / "virt-builder-cache"

    @property
    def templates(self) -> Path:
        return self.root / "templates"

    @property
    def downloads(self) -> Path:
        """Vendors' cloud images as downloaded (partial ones resume from here)."""
        return self.root / "downloads"

    @property
    def ssh(self) -> Path:
        return self.root / "ssh"

    @property
    def known_hosts(self) -> Path:
        return self.ssh / "known_hosts"

    @property
    def runs(self) -> Path:
        return self.root / "run"

    def run(self, run_id: str) -> Path:
        return self.runs / run_id

    @property
    def memory_lock(self) -> Path:
        """Held while counting guests' memory and creating one (virt/admission.py)."""
        return self.runs / "memory.lock"

    @property
    def kept(self) -> Path:
        return self.root / "kept"

    @property
    def saves(self) -> Path:
        return self.root / "saves"

    @property
    def cache_id(self) -> Path:
        return self.saves / "cache-id"

    @property
    def reaper_log(self) -> Path:
        return self.root / "reaper.log"

    def save_dir(self, distro: str, key: str) -> Path:
        """The restore slots of one profile under one save key."""
        return self.saves / f"{distro}-{key}"

    def save_slot(self, distro: str, key: str, slot: int) -> Path:
        return self.save_dir(distro, key) / f"slot-{slot}"

"""The saved-state cache: booted guests saved once, restored many times (restore slots).

A restore cannot rename a domain: libvirt's ABI check refuses another name or UUID, for
`virDomainRestoreFlags` and for `virDomainSaveImageDefineXML` alike. Two guests restored
from one save at once would need one name, so each save is a *slot*: its own domain
name, its own UUID, its own save file and frozen disk, used by one guest at a time.

``<cache>/saves/<distro>-<key>/slot-<n>/`` holds ``state.save`` (libvirt's save image),
``disk.qcow2`` (the guest's disk at the moment of the save, an overlay of the cached
image; every restore runs on an overlay of it), ``meta.json`` (written last: a slot
without it is not valid) and ``lease.lock``. A process holds a slot's lease (a file
lock, dropped by the kernel when the process dies) while it builds the slot or runs a
guest restored from it. The key hashes what a save depends on: the image build, the
domain XML, accel, memory, vCPUs, the libvirt and QEMU versions and the cache itself
(slot names are unique per libvirt host); a changed image gets a new key, and the saves
of old keys are deleted when nobody holds them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from ..host.atomic import atomic_write
from ..host.layout import CacheLayout
from ..virt import domain_xml

# Bump when what a slot holds, or how it is prepared before saving, changes.
SAVE_FORMAT_VERSION = 1
# Guests of one profile restored at once per cache (shared + fresh + xdist workers).
MAX_SLOTS = 4
_KEY = re.compile(r"[0-9a-f]{16}")


@dataclass(frozen=True)
class Slot:
    """One restore slot: a save image and the disk it was saved with."""

    distro: str
    key: str
    index: int
    dir: Path

    @property
    def name(self) -> str:
        """The domain name every guest of this slot has (a restore cannot change it)."""
        return f"{domain_xml.NAME_PREFIX}{self.distro}-s{self.index}-{self.key[:8]}"

    @property
    def state(self) -> Path:
        return self.dir / "state.save"

    @property
    def disk(self) -> Path:
        return self.dir / "disk.qcow2"

    @property
    def meta(self) -> Path:
        return self.dir / "meta.json"

    @property
    def build_console(self) -> Path:
        return self.dir / "build.console.log"

    def partial(self, path: Path) -> Path:
        return path.with_name(path.name + ".partial")


class Lease:
    """A held slot: released by `release()` or, at the latest, when the process ends."""

    def __init__(self, slot: Slot, lock: FileLock) -> None:
        self.slot = slot
        self._lock = lock

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release()


def save_key(
    *,
    cache_root: Path,
    image_key: str,
    image_built_at: str,
    domain_xml: str,
    libvirt_version: int,
    qemu_version: int,
) -> str:
    """16 hex digits over everything a save depends on (domain_xml carries accel,
    memory, vCPUs and the share, as the builder writes them)."""
    material = json.dumps(
        {
            "format": SAVE_FORMAT_VERSION,
            "cache": str(cache_root.resolve()),
            "image": [image_key, image_built_at],
            "xml": domain_xml,
            "libvirt": libvirt_version,
            "qemu": qemu_version,
        },
        sort_keys=True,
    )
    return hashlib.sha256(material.encode()).hexdigest()[:16]


class SaveCache:
    """The restore slots under one cache directory."""

    def __init__(self, root: Path, *, max_slots: int = MAX_SLOTS) -> None:
        self.layout = CacheLayout(Path(root))
        self.max_slots = max_slots

    def slots(self, distro: str, key: str) -> Iterator[Slot]:
        for i in range(self.max_slots):
            yield Slot(distro, key, i, self.layout.save_slot(distro, key, i))

    def lease(self, distro: str, key: str) -> Lease | None:
        """The first slot nobody holds, valid ones first; None when all are held."""
        free: list[Lease] = []
        for slot in self.slots(distro, key):
            slot.dir.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(slot.dir / "lease.lock"))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            if self.valid(slot):
                for other in free:
                    other.release()
                return Lease(slot, lock)
            free.append(Lease(slot, lock))
        for other in free[1:]:
            other.release()
        return free[0] if free else None

    def valid(self, slot: Slot) -> bool:
        """The slot's files are whole and were saved under its key."""
        try:
            meta = json.loads(slot.meta.read_text())
            return bool(
                meta["key"] == slot.key
                and slot.state.stat().st_size == meta["state_size"]
                and slot.disk.is_file()
            )
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def install(self, lease: Lease, build: Callable[[Path, Path], None]) -> None:
        """Fill the held slot: `build(state_tmp, disk_tmp)` saves a guest whose disk is
        `disk_tmp` into `state_tmp`; both are renamed into place, then meta.json."""
        slot = lease.slot
        slot.meta.unlink(missing_ok=True)  # invalid from here until the end
        state_tmp, disk_tmp = slot.partial(slot.state), slot.partial(slot.disk)
        for stale in (state_tmp, disk_tmp, slot.state, slot.disk):
            stale.unlink(missing_ok=True)
        try:
            build(state_tmp, disk_tmp)
            os.replace(disk_tmp, slot.disk)
            os.replace(state_tmp, slot.state)
        except BaseException:
            state_tmp.unlink(missing_ok=True)
            disk_tmp.unlink(missing_ok=True)
            raise
        meta = {"key": slot.key, "state_size": slot.state.stat().st_size, "name": slot.name}
        atomic_write(slot.meta, json.dumps(meta, indent=2))

    def prune(self, distro: str, keep_key: str) -> list[Path]:
        """Delete the saves of `distro` under other keys (an old image, another libvirt)
        whose slots nobody holds. Returns what was deleted."""
        removed: list[Path] = []
        for d in sorted(self.layout.saves.glob(f"{distro}-*")):
            key = d.name[len(distro) + 1 :]
            if key == keep_key or not _KEY.fullmatch(key) or not d.is_dir():
                continue
            held: list[FileLock] = []
            try:
                for path in d.glob("slot-*/lease.lock"):
                    lock = FileLock(str(path))
                    lock.acquire(timeout=0)
                    held.append(lock)
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
            except Timeout:
                pass  # a guest of an older save still runs somewhere: next time
            finally:
                for lock in held:
                    lock.release()
        return removed

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
domain XML, accel, memory, vCPUs, the libvirt and QEMU versions, the host's CPU and
kernel (the guest runs on host-passthrough) and the cache itself. Slot names carry
the cache's random id (``saves/cache-id``, made once) besides the key, so two caches
on one libvirt host name their slots apart. A changed image gets a new key, and the
saves of old keys are deleted when nobody holds them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree as ET

from filelock import FileLock, Timeout

from ..errors import DevboxError
from ..host.atomic import atomic_write
from ..host.layout import CacheLayout
from ..virt import domain_xml

# Bump when what a slot holds, or how it is prepared before saving, changes.
SAVE_FORMAT_VERSION = 1
# Guests of one profile restored at once per cache (shared + fresh + xdist workers).
MAX_SLOTS = 4
_KEY = re.compile(r"[0-9a-f]{16}")
_CACHE_ID = re.compile(r"[0-9a-f]{6}")


@dataclass(frozen=True)
class Slot:
    """One restore slot: a save image and the disk it was saved with."""

    distro: str
    key: str
    index: int
    dir: Path
    cache_id: str = ""

    @property
    def name(self) -> str:
        """The domain name every guest of this slot has (a restore cannot change it)."""
        cache = f"{self.cache_id}-" if self.cache_id else ""
        return f"{domain_xml.NAME_PREFIX}{self.distro}-s{self.index}-{cache}{self.key[:8]}"

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
    host: str,
    cache_id: str,
) -> str:
    """16 hex digits over everything a save depends on (domain_xml carries accel,
    memory, vCPUs and the share, as the builder writes them; `host` the host's CPU
    and kernel, see `host_fingerprint`)."""
    material = json.dumps(
        {
            "format": SAVE_FORMAT_VERSION,
            "cache": str(cache_root.resolve()),
            "cache_id": cache_id,
            "host": host,
            "image": [image_key, image_built_at],
            "xml": domain_xml,
            "libvirt": libvirt_version,
            "qemu": qemu_version,
        },
        sort_keys=True,
    )
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def host_fingerprint(capabilities_xml: str = "") -> str:
    """The host CPU (model, flags, microcode from /proc/cpuinfo; libvirt's host CPU from
    `capabilities_xml`) and kernel (uname -r) a save was made on: a microcode or kernel
    update that drops a CPUID feature must not restore guests that saw it."""
    cpu: dict[str, str] = {}
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n", 1)[0]
    except OSError:
        first = ""
    for line in first.splitlines():
        field, _, value = line.partition(":")
        if field.strip() in ("vendor_id", "model name", "flags", "microcode", "Features"):
            cpu[field.strip()] = value.strip()
    host_cpu = ""
    if capabilities_xml:
        with contextlib.suppress(ET.ParseError):
            found = ET.fromstring(capabilities_xml).find("host/cpu")
            host_cpu = "" if found is None else ET.tostring(found, encoding="unicode")
    return json.dumps({"cpu": cpu, "libvirt_cpu": host_cpu, "kernel": os.uname().release})


class SaveCache:
    """The restore slots under one cache directory."""

    def __init__(self, root: Path, *, max_slots: int = MAX_SLOTS) -> None:
        self.layout = CacheLayout(Path(root))
        self.max_slots = max_slots

    def cache_id(self) -> str:
        """This cache's random id: made once, by whoever comes first."""
        path = self.layout.cache_id
        with contextlib.suppress(OSError, UnicodeDecodeError):
            found = path.read_text().strip()
            if _CACHE_ID.fullmatch(found):
                return found
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = secrets.token_hex(3)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{fresh}")
        tmp.write_text(fresh + "\n")
        try:
            os.link(tmp, path)  # never replaces an id another process made first
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        found = path.read_text().strip()
        if not _CACHE_ID.fullmatch(found):
            raise DevboxError(f"{path} is not a cache id: delete it (it is made again)")
        return found

    def slots(self, distro: str, key: str) -> Iterator[Slot]:
        cache_id = self.cache_id()
        for i in range(self.max_slots):
            yield Slot(distro, key, i, self.layout.save_slot(distro, key, i), cache_id)

    def invalidate(self, slot: Slot) -> None:
        """A slot whose restore failed: rebuilt by its next lease (meta.json goes)."""
        slot.meta.unlink(missing_ok=True)

    def refuse(self, slot: Slot, reason: str) -> None:
        """Guests of this valid slot are never restored (see `refused`), e.g. when a
        restored guest's RNG reseed cannot be proven."""
        meta = json.loads(slot.meta.read_text())
        atomic_write(slot.meta, json.dumps({**meta, "refused": reason}, indent=2))

    def refused(self, slot: Slot) -> str:
        """Why guests of `slot` are booted instead ("" when they are restored)."""
        try:
            return str(json.loads(slot.meta.read_text()).get("refused", ""))
        except (OSError, ValueError, AttributeError):
            return ""

    def lease(self, distro: str, key: str) -> Lease | None:
        """The first slot nobody holds, valid ones first; None when all are held."""
        free: list[Lease] = []
        for slot in self.slots(distro, key):
            slot.dir.mkdir(parents=True, exist_ok=True)
            # Not thread-local: a lease taken in a thread is released from another.
            lock = FileLock(str(slot.dir / "lease.lock"), thread_local=False)
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
                    lock = FileLock(str(path), thread_local=False)
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

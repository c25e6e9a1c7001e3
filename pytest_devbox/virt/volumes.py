"""A remote host's disks, through libvirt itself: a storage pool of ours, cached images
uploaded into it as volumes (libvirt streams), one overlay volume and one console file
per guest, and the sweep of what dead sessions left there.

The pool is a transient `dir` pool: nothing is written into the remote host's libvirt
configuration, and after a libvirtd restart the next session defines it again over the
same directory, whose files (uploaded images) libvirt finds again on creation.

Names say whose a file is, so no database is needed:
  <distro>-<key>-<built>.qcow2~<token>     an upload of a cached image: the local cache's
                                           name, its build stamp (a rebuild has new host
                                           keys) and a token of that upload alone
  <distro>-<key>-<built>.qcow2~<token>.complete  its marker, made after the upload: an
                                           image without one is in progress or interrupted
  <domain>@<host>@<owner>.qcow2 / .console a guest's overlay and serial console, with the
                                           process that owns them (host/owner.py's token,
                                           the sweep's test; the host is for humans)
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import socket
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import libvirt
from filelock import FileLock

from ..errors import DomainError
from ..host import owner
from ..log import Log

MARKER = ".complete"
OVERLAY, CONSOLE = "qcow2", "console"
_GUEST_VOLUME = re.compile(
    rf"(?P<domain>devbox-[^@/]+)@(?P<host>[^@/]+)@(?P<owner>{owner.TOKEN_PATTERN})\.(?P<kind>\w+)"
)
_CHUNK = 1 << 20  # stream upload block


def _err(e: libvirt.libvirtError) -> str:
    return e.get_error_message() or str(e)


@dataclass(frozen=True)
class Upload:
    """A cached image to upload: its file, volume name, virtual size and cache lock."""

    path: Path
    name: str
    capacity: int
    lock: Path


# --- names ------------------------------------------------------------------------------


def pool_name(path: str) -> str:
    """One pool per directory: sessions naming another path get a pool of their own."""
    return "devbox-" + hashlib.sha256(path.encode()).hexdigest()[:10]


def image_volume(image: Path, built_at: str) -> str:
    """The volume of a cached image: its name in the cache, and when it was built."""
    built = re.sub(r"[^0-9]", "", built_at)[:14] or "unknown"
    return f"{image.stem}-{built}.qcow2"


def guest_volume(domain: str, kind: str) -> str:
    """A guest's overlay (OVERLAY) or console (CONSOLE) volume, owned by this process."""
    return f"{domain}@{socket.gethostname()}@{owner.me().token}.{kind}"


def parse_guest_volume(name: str) -> tuple[str, str, str, str] | None:
    """(domain, owner host, owner token, kind) of a guest volume's name, else None (an
    older name of (host, pid) too: it proves no owner dead, so it is never swept)."""
    m = _GUEST_VOLUME.fullmatch(name)
    return (m["domain"], m["host"], m["owner"], m["kind"]) if m else None


# --- XML --------------------------------------------------------------------------------


def pool_xml(name: str, path: str) -> str:
    pool = ET.Element("pool", type="dir")
    ET.SubElement(pool, "name").text = name
    target = ET.SubElement(ET.SubElement(pool, "target"), "path")
    target.text = path
    ET.indent(pool, space="  ")
    return ET.tostring(pool, encoding="unicode") + "\n"


def volume_xml(name: str, capacity: int, backing: str | None = None) -> str:
    """A qcow2 volume of ``capacity`` bytes, backed by the qcow2 at ``backing`` if given."""
    vol = ET.Element("volume")
    ET.SubElement(vol, "name").text = name
    ET.SubElement(vol, "capacity", unit="bytes").text = str(capacity)
    ET.SubElement(ET.SubElement(vol, "target"), "format", type="qcow2")
    if backing is not None:
        store = ET.SubElement(vol, "backingStore")
        ET.SubElement(store, "path").text = backing
        ET.SubElement(store, "format", type="qcow2")
    ET.indent(vol, space="  ")
    return ET.tostring(vol, encoding="unicode") + "\n"


def _raw_xml(name: str) -> str:
    return f"<volume><name>{name}</name><capacity>0</capacity></volume>"


# --- the pool ---------------------------------------------------------------------------


def ensure_pool(conn: libvirt.virConnect, path: str) -> libvirt.virStoragePool:
    """Our pool over ``path`` on the host of ``conn``, started (made if missing)."""
    name = pool_name(path)
    for _attempt in range(3):  # a concurrent session may create it between our calls
        try:
            pool = conn.storagePoolLookupByName(name)
            if not pool.isActive():
                pool.create(0)
            return pool
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_POOL:
                raise DomainError(f"cannot use the storage pool {name} ({path}): {_err(e)}") from e
        try:
            flags = libvirt.VIR_STORAGE_POOL_CREATE_WITH_BUILD
            return conn.storagePoolCreateXML(pool_xml(name, path), flags)
        except libvirt.libvirtError as e:
            last = e
    raise DomainError(
        f"cannot create the storage pool {name} over {path} on {conn.getURI()}: {_err(last)}\n"
        "choose another directory with --devbox-remote-pool"
    )


def pool_path(pool: libvirt.virStoragePool) -> str:
    return ET.fromstring(pool.XMLDesc(0)).findtext("target/path", "")


def lookup(pool: libvirt.virStoragePool, name: str) -> libvirt.virStorageVol | None:
    """The volume ``name``, refreshing the pool once for files libvirt did not make."""
    for refresh in (False, True):
        if refresh:
            pool.refresh(0)
        try:
            return pool.storageVolLookupByName(name)
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_VOL:
                raise DomainError(f"cannot look up the volume {name}: {_err(e)}") from e
    return None


def delete(pool: libvirt.virStoragePool, name: str) -> bool:
    """Delete the volume ``name``; False when there was none."""
    vol = lookup(pool, name)
    if vol is None:
        return False
    try:
        vol.delete(0)
    except libvirt.libvirtError as e:
        if e.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_VOL:
            raise DomainError(f"cannot delete the volume {name}: {_err(e)}") from e
    return True


# --- images -----------------------------------------------------------------------------


def upload_image(
    conn: libvirt.virConnect,
    pool: libvirt.virStoragePool,
    source: Upload,
    log: Log,
) -> libvirt.virStorageVol:
    """A complete volume of ``source`` on the pool's host, uploaded now if there is none.

    Each upload goes to a name of its own (``<name>~<token>``) and is published by its
    marker (``<name>~<token>.complete``), made once every byte is in: two hosts uploading
    one image never touch each other's volume, and no upload is ever deleted but by the
    process that made it. A marker is trusted only when its volume has the source's size.
    Uploads of one image from this host are serialised by the local image's own lock.
    """
    size = source.path.stat().st_size
    vol = _complete(pool, source.name, size)
    if vol is not None:
        return vol
    with FileLock(str(source.lock)):
        vol = _complete(pool, source.name, size)
        if vol is not None:
            return vol
        staged = f"{source.name}~{uuid.uuid4().hex[:12]}"
        t0 = time.monotonic()
        try:
            vol = _upload(conn, pool, source, staged)
            pool.createXML(_raw_xml(staged + MARKER), 0)
        except BaseException:
            with contextlib.suppress(DomainError, libvirt.libvirtError):
                delete(pool, staged)  # ours alone: nobody else uses a name with our token
            raise
        seconds = time.monotonic() - t0
        log(
            f"uploaded {source.path.name} to {conn.getURI()} as {staged}: "
            f"{size / 1e6:.0f} MB in {seconds:.1f} s ({size / 1e6 / max(seconds, 1e-3):.0f} MB/s)"
        )
        return vol


def _complete(pool: libvirt.virStoragePool, name: str, size: int) -> libvirt.virStorageVol | None:
    """A published upload of ``name`` whose file has ``size`` bytes (the oldest scheme's
    ``<name>`` with ``<name>.complete`` too), else None."""
    try:
        pool.refresh(0)
        names = set(pool.listVolumes())
    except libvirt.libvirtError as e:
        raise DomainError(f"cannot list the volumes of our storage pool: {_err(e)}") from e
    staged = sorted(n[: -len(MARKER)] for n in names if n.endswith(MARKER))
    for candidate in staged:
        if candidate != name and not candidate.startswith(name + "~"):
            continue
        vol = lookup(pool, candidate) if candidate in names else None
        if vol is not None and _file_size(vol) == size:
            return vol
    return None


def _file_size(vol: libvirt.virStorageVol) -> int | None:
    """The length of a volume's file (not its qcow2 virtual size); None if unknown."""
    try:
        try:
            return int(vol.infoFlags(libvirt.VIR_STORAGE_VOL_GET_PHYSICAL)[2])
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                raise
            return int(vol.info()[2])  # a libvirt without it: the allocation
    except libvirt.libvirtError:
        return None  # gone meanwhile


def _upload(
    conn: libvirt.virConnect, pool: libvirt.virStoragePool, source: Upload, name: str
) -> libvirt.virStorageVol:
    path = source.path
    size = path.stat().st_size
    try:
        vol = pool.createXML(volume_xml(name, source.capacity), 0)
        stream = conn.newStream(0)
        with open(path, "rb") as f:
            vol.upload(stream, 0, size, 0)
            stream.sendAll(lambda _s, n, fh: fh.read(min(n, _CHUNK)), f)
        stream.finish()
    except libvirt.libvirtError as e:
        raise DomainError(f"uploading {path} to {conn.getURI()} as {name} failed: {_err(e)}") from e
    return vol


def overlay(
    pool: libvirt.virStoragePool, base: libvirt.virStorageVol, name: str
) -> libvirt.virStorageVol:
    """A qcow2 volume backed by ``base`` (which stays untouched)."""
    try:
        capacity = base.info()[1]
        return pool.createXML(volume_xml(name, capacity, backing=base.path()), 0)
    except libvirt.libvirtError as e:
        raise DomainError(f"cannot create the overlay volume {name}: {_err(e)}") from e


def read_tail(conn: libvirt.virConnect, pool: libvirt.virStoragePool, name: str) -> bytes:
    """The last 64 KiB of the file ``name`` in the pool (a console log); b"" if none."""
    try:
        vol = lookup(pool, name)
        if vol is None:
            return b""
        size = vol.info()[1]
        offset = max(0, size - 64 * 1024)
        stream = conn.newStream(0)
        chunks: list[bytes] = []
        vol.download(stream, offset, size - offset, 0)
        stream.recvAll(lambda _s, data, acc: acc.append(data), chunks)
        stream.finish()
    except (libvirt.libvirtError, DomainError):
        return b""
    return b"".join(chunks)


# --- the sweep --------------------------------------------------------------------------


def sweep(
    pool: libvirt.virStoragePool, live: Iterable[str], dead: Callable[[str], bool]
) -> list[str]:
    """Delete guest volumes whose domain is not in ``live`` and whose owner token is
    ``dead`` (provably: another host's or container's volumes are left alone)."""
    live = set(live)
    done: list[str] = []
    pool.refresh(0)
    for name in sorted(pool.listVolumes()):
        parsed = parse_guest_volume(name)
        if parsed is None:
            continue
        domain, _host, token, _kind = parsed
        if domain in live or not dead(token):
            continue
        if delete(pool, name):
            done.append(f"removed leftover volume {name} (owner {token} is gone)")
    return done

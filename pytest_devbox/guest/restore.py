"""Restoring instead of booting: a guest from a saved, booted guest in seconds.

Once per image (and libvirt/QEMU, accel, memory...), a guest of the profile boots into
a restore slot (guest/slots.py) with `<genid/>`, /code is unmounted (9p refuses to be
saved while mounted), SSH is closed (TCP does not survive a save) and libvirt saves it.
Every later guest restores a slot onto an overlay of the slot's frozen disk, with its
own console file, /code directory and metadata (all a restore may change), and then:
a new port forward (QEMU's user network forgets it), the clock stepped to the host's
(the guest resumes at the moment of the save), the RNG reseeded from the host (see
`RESEED`), /code mounted.

Guests sharing /code over 9p are restored, and so are those with share "sync" (no
device at all; the save is made before anything is copied, so a restored guest gets a
full copy of the code dir, as a booted one does). Virtiofs guests are restored where the
host stack can save them (host/stack.py: QEMU >= 8.2, the Rust virtiofsd >= 1.11,
libvirt >= 10.5); elsewhere they boot (hot-plugging a virtiofs share crashed libvirt
9.0's daemon when tried by hand, so there is no save-without-it-then-plug). virtiofsd
puts the guest's open inodes in the save, and the new virtiofsd of a restore reopens
them by path in its own directory: so /code is unmounted and the guest's caches dropped
before the save (only the root inode is left), and a restore onto another code dir
finds nothing missing. Restored guests have no AUTODESTROY: the reaper
(guest/reaper.py) and the sweep destroy them when their process dies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
import shlex
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import libvirt

from ..config.profiles import Profile
from ..errors import DevboxError, DomainError, RestoreUnavailable
from ..host.layout import CacheLayout
from ..host.stack import Stack
from ..host.stack import probe as probe_stack
from ..image import qemu_img
from ..image.cache import ImageInfo
from ..log import Log
from ..transport.ssh import Connection
from ..virt import domain as dom
from ..virt import domain_xml
from ..virt.admission import NoMemory
from .readiness import Boot, Deadline, authenticate, mount_code, wait_banner, wait_ready
from .reaper import Reaper
from .slots import MAX_SLOTS, Lease, SaveCache, host_fingerprint, save_key
from .sweep import owner_dead

# Shares every stack can save; virtiofs only where host/stack.py says so.
RESTORE_SHARES = ("9p", "sync")
# Before a save: /code unmounted (9p refuses a save while mounted; virtiofs would carry
# the guest's open inodes into it), written out, and virtiofs's cached inodes forgotten.
PREPARE_SAVE = {
    "9p": "umount /code && sync",
    "virtiofs": "umount /code && sync && echo 3 > /proc/sys/vm/drop_caches",
    "sync": "sync",
}
# The guest's RNG gets host bytes and is reseeded at once (RNDADDENTROPY credits them,
# RNDRESEEDCRNG reseeds; Linux >= 4.17), or the kernel's vmgenid driver (Linux >= 5.18)
# reseeded it when the restore changed the <genid>. Without either, every clone of one
# save would give the same random bytes until its next periodic reseed, so a guest whose
# reseed is not proven is refused (booted instead). The seed comes on stdin: the command
# line is kept in the history that failure reports print.
_RESEED_PY = (
    "import fcntl,os,struct,sys;b=bytes.fromhex(sys.stdin.read().strip());"
    "fd=os.open('/dev/random',os.O_WRONLY);"
    "fcntl.ioctl(fd,0x40085203,struct.pack('ii',len(b)*8,len(b))+b);"
    "fcntl.ioctl(fd,0x5207)"
)
_RESEED_SH = (
    "for py in python3 /usr/libexec/platform-python; do "
    "command -v $py >/dev/null 2>&1 || continue; "
    f"$py -c {shlex.quote(_RESEED_PY)} 2>/dev/null && {{ echo reseed=ioctl; exit 0; }}; "
    "break; done; "
    "set -- $(uname -r | tr '.-' '  '); "
    'if [ "${1:-0}" -gt 5 ] || { [ "${1:-0}" -eq 5 ] && [ "${2:-0}" -ge 18 ]; }; then '
    "ls /sys/bus/acpi/drivers/vmgenid 2>/dev/null | grep -q : "
    "&& { echo reseed=vmgenid; exit 0; }; "
    "fi; echo reseed=none"
)
RESEEDED = ("reseed=ioctl", "reseed=vmgenid")
MakeSpec = Callable[[str, Path, Path], domain_xml.DomainSpec]  # (name, disk, console) -> spec


def unrestorable(profile: Profile, share: str = "", stack: Stack | None = None) -> str | None:
    """Why guests of `profile` with `share` (default: the profile's) are booted, not
    restored, on a host with `stack` (None: one that cannot save virtiofs); None when
    they can be restored."""
    share = share or profile.share
    if share in RESTORE_SHARES or (share == "virtiofs" and stack and stack.virtiofs_restore):
        return None
    if share == "virtiofs":
        line = stack.restore_line() if stack else "virtiofs guests cannot be saved here"
        return f'{line} (a profile with share = "9p" restores in seconds)'
    return f"its /code share is {share}, which cannot be saved"


def host_stack(virconn: libvirt.virConnect) -> Stack:
    """The stack behind a connection (host/stack.py), once per URI and process."""
    uri = virconn.getURI()
    if uri not in _STACKS:
        _STACKS[uri] = probe_stack(virconn.getLibVersion(), virconn.getVersion(), uri)
    return _STACKS[uri]


def stack_at(uri: str) -> Stack | None:
    """The stack behind `uri` (None when libvirt cannot be reached: the boot that
    follows says why)."""
    try:
        virconn = dom.connect(uri)
    except DevboxError:
        return None
    try:
        return host_stack(virconn)
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            virconn.close()


_STACKS: dict[str, Stack] = {}


def restore_xml(
    saved: str,
    *,
    disk: Path,
    code_dir: Path,
    console_log: Path,
    metadata: Mapping[str, str],
    link: domain_xml.PrivateLink | None = None,
) -> str:
    """The XML of a save image (as libvirt gives it) changed for one restore: a disk
    overlay, /code's directory, the console file, the metadata and the private link's
    ports of its own. libvirt's ABI check lets a restore change these and nothing that
    the guest can see."""
    root = ET.fromstring(saved)
    if link is not None:
        domain_xml.set_link_ports(root, link)
    disk_source = root.find("devices/disk[@device='disk']/source")
    if disk_source is None:
        raise DomainError("the saved guest has no disk: the save image is not one of ours")
    disk_source.set("file", str(disk))
    for fs in root.iterfind("devices/filesystem"):
        source = fs.find("source")
        if source is not None and fs.find(f"target[@dir='{domain_xml.SHARE_TAG}']") is not None:
            source.set("dir", str(code_dir))
    for chardev in ("serial", "console"):
        for source in root.iterfind(f"devices/{chardev}/source"):
            source.set("path", str(console_log))
    old = root.find("metadata")
    if old is not None:
        root.remove(old)
    domain_xml.add_metadata(root, metadata)
    return ET.tostring(root, encoding="unicode")


def freshen_command(now: float | None = None) -> str:
    """Step the clock to the host's and reseed the RNG from a seed on stdin: what a
    restored guest needs first. Prints one of RESEEDED when the reseed is proven."""
    now = time.time() if now is None else now
    return f"date -s @{now:.3f} >/dev/null && {{ {_RESEED_SH}; }}"


def new_seed() -> str:
    return secrets.token_bytes(64).hex() + "\n"


class SlotBusy(RestoreUnavailable):
    """A live guest of another owner has the slot's name: the slot itself is fine."""


class Unseeded(RestoreUnavailable):
    """The restored guest's RNG reseed cannot be proven: its slot is refused."""


@dataclass
class Restored:
    """A restored guest ready for commands, and what its end must undo."""

    domain: dom.Domain
    ssh: Connection
    overlay: Path
    console: Path
    lease: Lease
    reaper: Reaper

    def release(self) -> None:
        """After the domain is destroyed: no more reaping, the slot is free."""
        self.reaper.forget(self.domain.name)
        self.lease.release()


@dataclass(frozen=True)
class RestoreJob:
    """Everything one restore needs from the machine that asks for it."""

    profile: Profile
    share: str  # the guest's: the profile's, or --devbox-share's
    virconn: libvirt.virConnect
    image: ImageInfo
    cache_root: Path
    workdir: Path
    make_spec: MakeSpec
    timeout: float
    connection: Callable[[int], Connection]
    tail: Callable[[Path, int], str]
    log: Log
    # Held around each libvirt call that creates a guest (memory admission), only that.
    admit: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext


def restore_guest(job: RestoreJob) -> Restored:
    """A guest of `job.profile` restored from a slot (built first when there is none).
    RestoreUnavailable when that cannot be done: the caller boots instead."""
    reason = unrestorable(job.profile, job.share, host_stack(job.virconn))
    if reason:
        raise RestoreUnavailable(reason)
    saves = SaveCache(job.cache_root)
    key = _key(job)
    family = _family(job)
    lease = saves.lease(family, key)
    if lease is None:
        raise RestoreUnavailable(f"all {MAX_SLOTS} restore slots are in use")
    refused = saves.refused(lease.slot) if saves.valid(lease.slot) else ""
    if refused:
        lease.release()
        raise RestoreUnavailable(refused)
    try:
        if not saves.valid(lease.slot):
            t0 = time.monotonic()
            job.log(f"{job.profile.name}: booting a guest to save for restores (once per image)")
            saves.install(lease, lambda state, disk: _save_booted(job, lease, state, disk))
            job.log(f"{job.profile.name}: saved in {time.monotonic() - t0:.1f} s")
            saves.prune(family, key)
        return _restore(job, lease)
    except NoMemory:
        lease.release()
        raise  # a boot instead would not fit either
    except DevboxError as e:
        _after_failure(job, saves, lease, e)
        lease.release()
        raise RestoreUnavailable(str(e)) from e
    except BaseException:
        lease.release()
        raise


def _after_failure(job: RestoreJob, saves: SaveCache, lease: Lease, e: DevboxError) -> None:
    """A slot that failed to restore is rebuilt next time (bit rot, a QEMU that rejects
    it); one whose guests cannot be reseeded is refused for good; a busy name is no
    fault of the slot's."""
    if isinstance(e, SlotBusy) or not saves.valid(lease.slot):
        return
    if isinstance(e, Unseeded):
        saves.refuse(lease.slot, str(e))
        job.log(f"{job.profile.name}: restore refused for this image: {e}")
    else:
        saves.invalidate(lease.slot)
        job.log(f"{job.profile.name}: restore slot {lease.slot.index} failed: rebuilt next time")


def _shape(job: RestoreJob) -> domain_xml.DomainSpec:
    """The spec of the job's guests without what differs per guest (name, paths,
    metadata, a private link's ports): what a save depends on."""
    spec = dataclasses.replace(
        job.make_spec(domain_xml.NAME_PREFIX + "slot", Path("/disk"), Path("/console")),
        code_dir=Path("/code"),
        metadata={},
        genid=True,
    )
    if spec.link is not None:  # its MAC is the save's; its ports are each restore's
        spec = dataclasses.replace(spec, link=spec.link.shape())
    return spec


def _family(job: RestoreJob) -> str:
    """Whose slots these are: the profile's, or one end of a private link's (its own
    saves, with that end's NIC), so neither prunes the other's saves when it saves."""
    link = _shape(job).link
    return job.profile.name if link is None else f"{job.profile.name}-link{link.mac[-2:]}"


def _key(job: RestoreJob) -> str:
    spec = _shape(job)
    return save_key(
        cache_root=job.cache_root,
        image_key=job.image.key,
        image_built_at=str(job.image.metadata.get("built_at", "")),
        domain_xml=domain_xml.build_xml(spec),
        libvirt_version=job.virconn.getLibVersion(),
        qemu_version=job.virconn.getVersion(),
        host=host_fingerprint(job.virconn.getCapabilities()),
        cache_id=SaveCache(job.cache_root).cache_id(),
    )


def _save_booted(job: RestoreJob, lease: Lease, state: Path, disk: Path) -> None:
    """Boot a guest on `disk`, make it ready to be saved, save it to `state`."""
    slot = lease.slot
    qemu_img.create_overlay(job.image.path, disk)
    spec = dataclasses.replace(job.make_spec(slot.name, disk, slot.build_console), genid=True)
    _clear_leftover(job, slot.name)
    with job.admit():
        domain = dom.Domain.create(job.virconn, spec, autodestroy=True)
    try:
        boot = Boot(domain, job.profile.name, slot.build_console, Deadline(job.timeout), job.tail)
        ssh = wait_ready(boot, connection=job.connection, share=job.share)
        try:
            ssh.run(PREPARE_SAVE[job.share], cwd=None, timeout=60)
        finally:
            ssh.close()
        domain.save(state)
    except BaseException:
        domain.destroy()
        raise


def _restore(job: RestoreJob, lease: Lease) -> Restored:
    slot = lease.slot
    suffix = uuid.uuid4().hex[:4]
    overlay = qemu_img.create_overlay(slot.disk, job.workdir / f"{slot.name}-{suffix}.qcow2")
    console = job.workdir / f"{slot.name}-{suffix}.console.log"
    spec = job.make_spec(slot.name, overlay, console)
    xml = restore_xml(
        dom.saved_xml(job.virconn, slot.state),
        disk=overlay,
        code_dir=spec.code_dir,
        console_log=console,
        metadata=spec.metadata,
        link=spec.link,
    )
    _clear_leftover(job, slot.name)
    reaper = Reaper.for_uri(job.virconn.getURI(), CacheLayout(job.cache_root).reaper_log)
    domain: dom.Domain | None = None
    try:
        reaper.watch(slot.name)  # before the guest exists: never unwatched
        with job.admit():
            domain = dom.Domain.restore(job.virconn, slot.state, xml)
        boot = Boot(domain, job.profile.name, console, Deadline(job.timeout), job.tail)
        ssh = _ready(boot, job)
    except BaseException:
        if domain is not None:
            domain.destroy()
        reaper.forget(slot.name)
        overlay.unlink(missing_ok=True)
        raise
    return Restored(domain, ssh, overlay, console, lease, reaper)


def _ready(boot: Boot, job: RestoreJob) -> Connection:
    """Forward SSH again, log in, set the clock and the RNG, mount /code (a sync
    guest's /code is copied by the machine once this returns)."""
    boot.check_alive("running")
    port = boot.domain.forward_port(22)
    wait_banner(boot, port)
    ssh = job.connection(port)
    try:
        authenticate(boot, ssh)
        fresh = ssh.run(
            freshen_command(), cwd=None, timeout=boot.deadline.cap(30.0), stdin=new_seed()
        )
        if not any(word in fresh.stdout for word in RESEEDED):
            raise Unseeded(
                "a restored guest's RNG reseed cannot be proven (it needs python3 and "
                "Linux >= 4.17, or Linux >= 5.18 with vmgenid): without it every guest "
                "restored from one save shares its random numbers"
            )
        if job.share != "sync":
            mount_code(boot, ssh, job.share)
    except BaseException:
        ssh.close()
        raise
    return ssh


def _clear_leftover(job: RestoreJob, name: str) -> None:
    """A domain with the slot's name while we hold its lease is a leftover of a dead
    process (its reaper or the sweep has not got to it yet), or a live guest of another
    cache with the same id (a copied cache) or of a process we cannot see: destroyed
    only when its owner is provably dead, else SlotBusy."""
    try:
        virdom = job.virconn.lookupByName(name)
        meta = domain_xml.read_metadata(virdom.XMLDesc(0))
    except libvirt.libvirtError:
        return  # none: the usual case
    if not owner_dead(meta):
        raise SlotBusy(
            f"the restore slot's guest name {name} is taken by a running guest whose owner "
            f"({meta.get('owner') or 'unknown'}) may be alive"
        )
    with contextlib.suppress(libvirt.libvirtError):
        virdom.destroy()
        job.log(f"{job.profile.name}: destroyed leftover guest {name}")

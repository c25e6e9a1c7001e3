"""libvirt: the domain XML builder and the lifecycle of one transient guest.

The XML is built as an ElementTree object model (never formatted strings), one small
builder per element, and serialised pretty and deterministic so golden files are stable.
"""

from __future__ import annotations

import errno
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import libvirt
import libvirt_qemu

from .errors import DomainError, HostNotReady
from .settings import SYSTEM_URI

NAME_PREFIX = "devbox-"
METADATA_NS = "https://pytest-devbox.invalid/xmlns/1"
METADATA_PREFIX = "devbox"
SHARE_TAG = "/code"
SHARES = ("virtiofs", "9p")
ACCELS = ("kvm", "tcg")
# The netdev id libvirt derives from a user-set alias: "host" + alias. Setting the alias
# ourselves keeps the id the monitor commands need independent of device numbering.
NET_ALIAS = "ua-devbox-net"
NETDEV_ID = "host" + NET_ALIAS

ET.register_namespace(METADATA_PREFIX, METADATA_NS)

_START_LIBVIRTD = (
    "start libvirtd: `scripts/setup-host`, or `sudo systemctl start libvirtd` "
    "(without systemd: `sudo virtlogd -d && sudo libvirtd -d`)"
)

_JOIN_LIBVIRT = (
    "add yourself to the libvirt group (`sudo usermod -aG libvirt $USER`, then log in "
    "again) or use --devbox-uri qemu:///session"
)

_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}


@dataclass(frozen=True)
class DomainSpec:
    """Everything that shapes one guest's libvirt XML."""

    name: str  # devbox-<distro>-<run id>
    disk: Path  # the per-VM qcow2 overlay
    code_dir: Path  # host directory exported under the mount tag "/code"
    share: str  # "virtiofs" | "9p"
    accel: str  # "kvm" | "tcg"
    console_log: Path  # the serial console is written to this file
    metadata: Mapping[str, str] = field(default_factory=dict)  # owner pid, run id, ...
    memory_mib: int = 1024
    vcpus: int = 2
    # Run QEMU as this (uid, gid) instead of libvirt's configured user (qemu_user.py).
    run_as: tuple[int, int] | None = None
    # Whether QEMU runs as root: only then can 9p keep the guest's file ownership.
    qemu_is_root: bool = True
    # A VM generation id: libvirt gives each restore of a save a new one, and Linux
    # >= 5.18 then reseeds its RNG, so clones of one save do not share random bytes.
    genid: bool = False

    def __post_init__(self) -> None:
        if not self.name.startswith(NAME_PREFIX):
            raise DomainError(f"domain name {self.name!r} must start with {NAME_PREFIX!r}")
        if self.share not in SHARES:
            raise DomainError(f"unknown share kind {self.share!r}: use one of {SHARES}")
        if self.accel not in ACCELS:
            raise DomainError(f"unknown accel {self.accel!r}: use one of {ACCELS}")


# --- XML builders ---------------------------------------------------------------------


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrib: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrib)
    if text is not None:
        el.text = text
    return el


def add_metadata(parent: ET.Element, values: Mapping[str, str]) -> None:
    # libvirt keeps one foreign element per namespace under <metadata>; keys go in an
    # attribute so any string is a valid key. Sorted, so the XML is deterministic.
    meta = _sub(_sub(parent, "metadata"), f"{{{METADATA_NS}}}devbox")
    for key in sorted(values):
        _sub(meta, f"{{{METADATA_NS}}}item", str(values[key]), key=key)


def _os(parent: ET.Element) -> None:
    os_ = _sub(parent, "os")
    _sub(os_, "type", "hvm", arch="x86_64", machine="pc")
    _sub(os_, "boot", dev="hd")
    # BIOS messages ("Boot failed: not a bootable disk") go to the serial console log too.
    _sub(os_, "bios", useserial="yes")


def _cpu(parent: ET.Element, accel: str) -> None:
    if accel == "kvm":
        _sub(parent, "cpu", mode="host-passthrough")
    else:
        # "maximum" is every feature TCG emulates (x86-64-v2/v3 included): newer distros
        # (CentOS Stream 9, RHEL 9+) refuse to boot on the default qemu64 model.
        _sub(parent, "cpu", mode="maximum")


def _memory_backing(parent: ET.Element) -> None:
    # virtiofsd maps guest memory, so it must be shared and file-backed.
    mb = _sub(parent, "memoryBacking")
    _sub(mb, "source", type="memfd")
    _sub(mb, "access", mode="shared")


def _disk(devices: ET.Element, path: Path) -> None:
    disk = _sub(devices, "disk", type="file", device="disk")
    # cache=unsafe ignores guest flushes: the overlay is thrown away with the VM, so
    # durability buys nothing and fsync-heavy package installs get much faster.
    _sub(disk, "driver", name="qemu", type="qcow2", cache="unsafe", discard="unmap")
    _sub(disk, "source", file=str(path))
    _sub(disk, "target", dev="vda", bus="virtio")


def _interface(devices: ET.Element) -> None:
    iface = _sub(devices, "interface", type="user")
    _sub(iface, "model", type="virtio")
    _sub(iface, "alias", name=NET_ALIAS)
    _sub(iface, "rom", enabled="no")  # no iPXE: we never net-boot, and its banner waits


def _filesystem(devices: ET.Element, share: str, code_dir: Path, qemu_is_root: bool) -> None:
    # 9p served by a QEMU that is not root cannot chown what the guest creates: with
    # passthrough every write of guest root fails (EPERM); squash ignores the chown, so
    # whatever the guest writes belongs to QEMU's user, who is the calling user
    # (qemu_user.py). virtiofsd is started by libvirt as root: passthrough always works.
    mode = "passthrough" if qemu_is_root or share == "virtiofs" else "squash"
    fs = _sub(devices, "filesystem", type="mount", accessmode=mode)
    if share == "virtiofs":
        # libvirt finds virtiofsd itself through /usr/share/qemu/vhost-user/*.json.
        _sub(fs, "driver", type="virtiofs")
    _sub(fs, "source", dir=str(code_dir))
    _sub(fs, "target", dir=SHARE_TAG)


def _console(devices: ET.Element, log: Path) -> None:
    # A plain file: qemu writes it directly, nothing has to read a pty for output to flow.
    # append=off: the file holds this boot only, so a console tail is never stale.
    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=str(log), append="off")
    _sub(serial, "target", port="0")
    console = _sub(devices, "console", type="file")
    _sub(console, "source", path=str(log), append="off")
    _sub(console, "target", type="serial", port="0")


def _devices(parent: ET.Element, spec: DomainSpec) -> None:
    devices = _sub(parent, "devices")
    _disk(devices, spec.disk)
    _interface(devices)
    _filesystem(devices, spec.share, spec.code_dir, spec.qemu_is_root)
    _console(devices, spec.console_log)
    rng = _sub(devices, "rng", model="virtio")  # entropy at boot: sshd starts sooner
    _sub(rng, "backend", "/dev/urandom", model="random")
    # Headless and minimal: no display, no USB, no balloon. pvpanic lets a kernel panic
    # show up as the "crashed" state instead of a silent hang.
    _sub(_sub(devices, "video"), "model", type="none")
    _sub(devices, "controller", type="usb", model="none")
    _sub(devices, "memballoon", model="none")
    _sub(devices, "panic", model="isa")


def _seclabel(parent: ET.Element, run_as: tuple[int, int]) -> None:
    # A static DAC label: this domain's QEMU runs as uid:gid, and libvirt hands it its
    # disk and console files as that user (relabel).
    label = _sub(parent, "seclabel", type="static", model="dac", relabel="yes")
    _sub(label, "label", f"+{run_as[0]}:+{run_as[1]}")


def build_xml(spec: DomainSpec) -> str:
    """The libvirt domain XML for `spec`, pretty-printed and deterministic."""
    root = ET.Element("domain", type="kvm" if spec.accel == "kvm" else "qemu")
    _sub(root, "name", spec.name)
    if spec.genid:
        _sub(root, "genid")
    add_metadata(root, spec.metadata)
    _sub(root, "memory", str(spec.memory_mib), unit="MiB")
    if spec.share == "virtiofs":
        _memory_backing(root)
    _sub(root, "vcpu", str(spec.vcpus))
    _os(root)
    features = _sub(root, "features")
    _sub(features, "acpi")  # the guest can power itself off
    _sub(features, "vmport", state="off")  # no VMware backdoor port and vmmouse
    _cpu(root, spec.accel)
    _sub(root, "on_poweroff", "destroy")
    _sub(root, "on_reboot", "restart")
    # preserve: the domain stays in the "crashed" state, so the boot watcher reports a
    # panic at once (with the console tail) instead of seeing the domain just vanish.
    # AUTODESTROY still removes it when our connection closes.
    _sub(root, "on_crash", "preserve")
    _devices(root, spec)
    if spec.run_as is not None:
        _seclabel(root, spec.run_as)
    ET.indent(root, space="  ")
    return ET.tostring(root, encoding="unicode") + "\n"


def read_metadata(xml: str) -> dict[str, str]:
    """The devbox metadata of a domain XML (as build_xml wrote it); {} if it has none."""
    root = ET.fromstring(xml)
    items = root.findall(f"metadata/{{{METADATA_NS}}}devbox/{{{METADATA_NS}}}item")
    return {item.get("key", ""): item.text or "" for item in items}


# --- connection -----------------------------------------------------------------------


def connect(uri: str) -> libvirt.virConnect:
    """Open libvirt at `uri`; HostNotReady (saying what to do) when that fails."""
    # libvirt prints every error to stderr by default, even ones we handle.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise HostNotReady(_connect_advice(uri, e)) from e


def _connect_advice(uri: str, e: libvirt.libvirtError) -> str:
    code, msg = e.get_error_code(), e.get_error_message() or str(e)
    sys_errno = e.get_int1() if code == libvirt.VIR_ERR_SYSTEM_ERROR else None
    if sys_errno in (errno.EACCES, errno.EPERM) or code in (
        libvirt.VIR_ERR_AUTH_FAILED,
        libvirt.VIR_ERR_AUTH_CANCELLED,
        libvirt.VIR_ERR_AUTH_UNAVAILABLE,
    ):
        return f"no permission to use libvirt at {uri}: {msg}\n{_JOIN_LIBVIRT}"
    if sys_errno in (errno.ENOENT, errno.ECONNREFUSED):
        return f"libvirtd is not running ({uri}: {msg})\n{_START_LIBVIRTD}"
    if code == libvirt.VIR_ERR_NO_CONNECT:
        return (
            f"no libvirt driver for {uri}: {msg}\n"
            f"check --devbox-uri (e.g. {SYSTEM_URI} or qemu:///session) and that "
            "libvirt-daemon-system and qemu-system-x86 are installed"
        )
    if os.geteuid() != 0 and "system" in uri:
        # An unprivileged user whom libvirtd turns away without a clear error code
        # (e.g. polkit without a system bus): membership of the libvirt group fixes it.
        return f"cannot open libvirt at {uri}: {msg}\n{_JOIN_LIBVIRT}"
    return f"cannot open libvirt at {uri}: {msg}\n{_START_LIBVIRTD}"


# --- one domain -----------------------------------------------------------------------

_USERNET_FWD = re.compile(
    r"^\s*TCP\[HOST_FORWARD\]\s+\S+\s+(?P<src>\S+)\s+(?P<sport>\d+)\s+\S+\s+(?P<dport>\d+)\b",
    re.MULTILINE,
)


def _forwards(usernet: str) -> set[tuple[str, int, int]]:
    """(host address, host port, guest port) of every TCP forward in `info usernet`."""
    return {(m["src"], int(m["sport"]), int(m["dport"])) for m in _USERNET_FWD.finditer(usernet)}


class Domain:
    """A running transient devbox domain and the connection that keeps it alive."""

    def __init__(self, virdom: libvirt.virDomain) -> None:
        self.virdom = virdom
        self.name: str = virdom.name()

    @classmethod
    def create(
        cls, conn: libvirt.virConnect, spec: DomainSpec, *, autodestroy: bool = True
    ) -> Domain:
        """Start a transient domain. With `autodestroy` libvirtd destroys it when `conn`
        closes, even if this process is SIGKILLed; without (`devbox up`), it runs until
        destroyed or powered off, and `devbox destroy`/the sweep find it by its metadata."""
        flags = libvirt.VIR_DOMAIN_START_AUTODESTROY if autodestroy else 0
        try:
            virdom = conn.createXML(build_xml(spec), flags)
        except libvirt.libvirtError as e:
            hint = (
                "check that the disk and code directory exist, and run `devbox doctor` "
                "to check the host (libvirtd, qemu, virtiofsd)"
            )
            if spec.share == "virtiofs" and "session" in conn.getURI():
                hint = f"virtiofs needs {SYSTEM_URI} before libvirt 10.0: use 9p or {SYSTEM_URI}"
            raise DomainError(
                f"libvirt could not start {spec.name}: {e.get_error_message() or e}\n{hint}"
            ) from e
        return cls(virdom)

    @classmethod
    def restore(cls, conn: libvirt.virConnect, save: Path, xml: str) -> Domain:
        """Start a guest from a save image with `xml` (see restore.restore_xml). libvirt has no
        AUTODESTROY for a restore: the caller must see to it that the guest goes away
        with its process (reaper.py)."""
        name = ET.fromstring(xml).findtext("name", "")
        try:
            # Flags 0: the guest resumes as it was saved (running, for every save of ours).
            conn.restoreFlags(str(save), xml, 0)
            return cls(conn.lookupByName(name))
        except libvirt.libvirtError as e:
            raise DomainError(
                f"libvirt could not restore {name} from {save}: {e.get_error_message() or e}"
            ) from e

    def save(self, path: Path) -> None:
        """Save the running guest's memory and device state to `path`; the guest stops."""
        try:
            self.virdom.save(str(path))
        except libvirt.libvirtError as e:
            raise DomainError(
                f"libvirt could not save {self.name} to {path}: {e.get_error_message() or e}"
            ) from e

    def _monitor(self, command: str) -> str:
        try:
            out: str = libvirt_qemu.qemuMonitorCommand(
                self.virdom, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
            )
        except libvirt.libvirtError as e:
            raise DomainError(
                f"QEMU monitor command {command!r} failed on {self.name}: "
                f"{e.get_error_message() or e}"
            ) from e
        return out

    def forward_port(self, guest_port: int = 22) -> int:
        """Forward a free port on 127.0.0.1 (picked by the kernel) to `guest_port`."""
        before = _forwards(self._monitor("info usernet"))
        out = self._monitor(f"hostfwd_add {NETDEV_ID} tcp:127.0.0.1:0-:{guest_port}")
        if out.strip():  # HMP reports failures as text, not as an error
            raise DomainError(f"could not forward a host port to {self.name}: {out.strip()}")
        new = _forwards(self._monitor("info usernet")) - before
        ports = [sport for src, sport, dport in new if dport == guest_port]
        if len(ports) != 1:
            raise DomainError(
                f"cannot find the forwarded port for guest port {guest_port} on {self.name} "
                f"in `info usernet`; new forwards: {sorted(new)}"
            )
        return ports[0]

    def state(self) -> str:
        """ "running", "paused", "crashed", "shutoff", ... A transient domain that stopped
        no longer exists: that is reported as "shutoff"."""
        try:
            st, _reason = self.virdom.state()
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return "shutoff"
            raise DomainError(
                f"cannot read the state of {self.name}: {e.get_error_message() or e}"
            ) from e
        return _STATES.get(st, f"unknown({st})")

    def is_running(self) -> bool:
        return self.state() == "running"

    def destroy(self) -> None:
        """Stop the guest at once. Idempotent: a domain already gone is fine."""
        try:
            self.virdom.destroy()
        except libvirt.libvirtError as e:
            if e.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
                return
            raise DomainError(f"cannot destroy {self.name}: {e.get_error_message() or e}") from e


def saved_xml(conn: libvirt.virConnect, save: Path) -> str:
    """The domain XML embedded in a save image."""
    try:
        xml: str = conn.saveImageGetXMLDesc(str(save), 0)
    except libvirt.libvirtError as e:
        raise DomainError(f"cannot read the save image {save}: {e.get_error_message() or e}") from e
    return xml


def list_devbox_domains(conn: libvirt.virConnect) -> list[tuple[str, dict[str, str]]]:
    """(name, metadata) of every domain whose name starts with "devbox-", sorted by name."""
    found = []
    try:
        domains = conn.listAllDomains(0)
    except libvirt.libvirtError as e:
        raise DomainError(f"cannot list libvirt domains: {e.get_error_message() or e}") from e
    for virdom in domains:
        try:
            name = virdom.name()
            if name.startswith(NAME_PREFIX):
                found.append((name, read_metadata(virdom.XMLDesc(0))))
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:  # vanished while listing
                raise DomainError(f"cannot read domain XML: {e.get_error_message() or e}") from e
    return sorted(found)

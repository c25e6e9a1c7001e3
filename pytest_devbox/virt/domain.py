"""libvirt: the connection and the lifecycle of one transient guest (its XML comes from
virt/domain_xml.py, re-exported here so `domain.DomainSpec` and `domain.build_xml` keep working).
"""

from __future__ import annotations

import errno
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path

import libvirt
import libvirt_qemu

from ..config.settings import SYSTEM_URI
from ..errors import DomainError, HostNotReady
from .domain_xml import (
    METADATA_NS,
    METADATA_PREFIX,
    NAME_PREFIX,
    NETDEV_ID,
    DomainSpec,
    build_xml,
    read_metadata,
)

__all__ = [
    "Domain",
    "connect",
    "list_devbox_domains",
]

# Debian and Ubuntu run the monolithic libvirtd, Fedora the modular virtqemud
# (scripts/host-packages says which units each host enables).
_START_LIBVIRTD = (
    "start libvirt's daemon: `scripts/setup-host`, or `sudo systemctl start libvirtd` "
    "(Fedora: `sudo systemctl start virtqemud.socket`; without systemd: "
    "`sudo virtlogd -d && sudo libvirtd -d`)"
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


def kvm_problem_of(conn: libvirt.virConnect) -> str | None:
    """None when the host of ``conn`` offers KVM to x86_64 guests, else libvirt's reason
    (for a remote host, where our /dev/kvm says nothing)."""
    try:
        conn.getDomainCapabilities(None, "x86_64", None, "kvm", 0)
    except libvirt.libvirtError as e:
        return e.get_error_message() or str(e)
    return None


# TCG emulates AVX, AVX2, FMA and F16C (x86-64-v3) from QEMU 7.2 on (qemu issue #844,
# "Close gap for x86_64-v3 ABI in TCG"); v2 long before.
TCG_V3_QEMU = 7_002_000


def tcg_level_problem(conn: libvirt.virConnect, spec: DomainSpec) -> str | None:
    """Why a TCG guest's CPU cannot have `spec.cpu_level` with this QEMU, or None."""
    if spec.accel != "tcg" or spec.cpu_level != "x86-64-v3":
        return None
    version = conn.getVersion()  # QEMU's: major * 1,000,000 + minor * 1,000 + micro
    if version >= TCG_V3_QEMU:
        return None
    have = f"{version // 1_000_000}.{version // 1000 % 1000}"
    return (
        f"its distro needs an x86-64-v3 CPU, which QEMU emulates from 7.2 on and this host "
        f"has QEMU {have}: upgrade QEMU, or use KVM on a host with AVX2"
    )


def uefi_problem(conn: libvirt.virConnect, accel: str = "tcg") -> str | None:
    """Why guests at `conn` cannot boot with UEFI firmware, or None when they can: its
    domain capabilities list no "efi" firmware (libvirt finds OVMF through the QEMU
    firmware descriptors the ovmf package installs)."""
    virttype = "kvm" if accel == "kvm" else "qemu"
    try:
        caps = conn.getDomainCapabilities(None, "x86_64", "pc", virttype, 0)
    except libvirt.libvirtError as e:
        return f"libvirt cannot tell its firmware ({e.get_error_message() or e})"
    values = ET.fromstring(caps).findall("os/enum[@name='firmware']/value")
    if any(v.text == "efi" for v in values):
        return None
    return (
        f"libvirt at {conn.getURI()} finds no UEFI firmware: install OVMF on that host "
        "(Debian/Ubuntu: apt-get install ovmf; Fedora: edk2-ovmf)"
    )


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
        problem = tcg_level_problem(conn, spec)
        if problem is not None:
            raise DomainError(f"cannot start {spec.name}: {problem}")
        if spec.firmware == "uefi":
            problem = uefi_problem(conn, spec.accel)
            if problem is not None:
                raise DomainError(f"cannot start {spec.name}: it boots with UEFI but {problem}")
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
        with its process (guest/reaper.py)."""
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

    def metadata(self) -> dict[str, str]:
        """The guest's devbox metadata (owner, overlay, keep, ...)."""
        try:
            return read_metadata(self.virdom.XMLDesc(0))
        except libvirt.libvirtError as e:
            raise DomainError(f"cannot read {self.name}'s XML: {e.get_error_message() or e}") from e

    def set_metadata(self, values: Mapping[str, str]) -> None:
        """Replace the running guest's devbox metadata (live: our domains are transient)."""
        root = ET.Element("devbox")
        for key in sorted(values):
            ET.SubElement(root, "item", key=key).text = values[key]
        # Without a namespace of its own: libvirt puts the element and its children in
        # ours (it refuses an element that declares the prefix itself).
        try:
            self.virdom.setMetadata(
                libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                ET.tostring(root, encoding="unicode"),
                METADATA_PREFIX,
                METADATA_NS,
                libvirt.VIR_DOMAIN_AFFECT_LIVE,
            )
        except libvirt.libvirtError as e:
            raise DomainError(
                f"cannot change {self.name}'s metadata: {e.get_error_message() or e}"
            ) from e

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

"""The libvirt domain XML of a devbox guest, as an ElementTree object model.

One small builder per element (never formatted strings), serialised pretty and
deterministic so golden files are stable. virt/domain.py hands the result to libvirt.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..config.settings import SHARE_CHOICES
from ..errors import DomainError

NAME_PREFIX = "devbox-"
METADATA_NS = "https://pytest-devbox.invalid/xmlns/1"
METADATA_PREFIX = "devbox"
SHARE_TAG = "/code"
# sync: no device at all, /code is a copy made over SSH (guest/sync.py).
ACCELS = ("kvm", "tcg")
FIRMWARES = ("bios", "uefi")
# The netdev id libvirt derives from a user-set alias: "host" + alias. Setting the alias
# ourselves keeps the id the monitor commands need independent of device numbering.
NET_ALIAS = "ua-devbox-net"
NETDEV_ID = "host" + NET_ALIAS

ET.register_namespace(METADATA_PREFIX, METADATA_NS)


@dataclass(frozen=True)
class PrivateLink:
    """A guest's second NIC on its topology's private network: Ethernet frames carried as
    UDP datagrams on 127.0.0.1, to the other guest's QEMU or to the group's hub
    (pool/topology.py says which).

    Why `type='udp'` and not `type='mcast'` (tried here, libvirt 9.0 / QEMU 7.2): libvirt
    9.0 drops an mcast interface's `<local address>`, so QEMU joins and sends the group on
    the default route's interface: guest frames would go out onto the host's LAN (TTL 1),
    not stay on loopback. A udp interface keeps both its ends on 127.0.0.1 (QEMU binds
    `local`, sends to `source`). A restore may change both ports (libvirt's ABI check
    does not look at a NIC's source), so the ports are given to each restore and are not
    part of a save's key; the MAC is (the ABI check compares it), hence one MAC per end.
    Any local process can send datagrams to these ports: the link isolates groups from
    each other, not from the host's users.
    """

    mac: str  # fixed per end: a save of one end restores only as that end
    local_port: int  # QEMU binds 127.0.0.1:local_port
    peer_port: int  # and sends to 127.0.0.1:peer_port (the other end's, or the hub's)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"52:54:00(:[0-9a-f]{2}){3}", self.mac):
            raise DomainError(f"private link MAC {self.mac!r} must be 52:54:00:xx:xx:xx")
        for port in (self.local_port, self.peer_port):
            if not 0 <= port <= 65535:
                raise DomainError(f"private link port {port} is not a UDP port")

    def shape(self) -> PrivateLink:
        """The link without its ports: what a save of it depends on."""
        return PrivateLink(self.mac, 0, 0)


@dataclass(frozen=True)
class DomainSpec:
    """Everything that shapes one guest's libvirt XML."""

    name: str  # devbox-<distro>-<run id>
    disk: Path  # the per-VM qcow2 overlay
    code_dir: Path  # host directory exported under the mount tag "/code"
    share: str  # "virtiofs" | "9p" | "sync" (no filesystem device)
    accel: str  # "kvm" | "tcg"
    console_log: Path  # the serial console is written to this file
    metadata: Mapping[str, str] = field(default_factory=dict)  # owner pid, run id, ...
    memory_mib: int = 1024
    vcpus: int = 2
    # Run QEMU as this (uid, gid) instead of libvirt's configured user (virt/qemu_user.py).
    run_as: tuple[int, int] | None = None
    # Whether QEMU runs as root: only then can 9p pass the guest's file ownership through.
    qemu_is_root: bool = True
    # Guest ids on /code (config/code_ids.py): "mapped" (9p keeps them in xattrs, guest
    # root is not host root), "passthrough" (the explicit opt-in) or "none" (sync).
    ids: str = "mapped"
    # A VM generation id: libvirt gives each restore of a save a new one, and Linux
    # >= 5.18 then reseeds its RNG, so clones of one save do not share random bytes.
    genid: bool = False
    # "bios" (SeaBIOS) or "uefi": libvirt picks an OVMF build from the host's firmware
    # descriptors (/usr/share/qemu/firmware, Debian's ovmf package).
    firmware: str = "bios"
    # The x86-64 level the guest's userland needs: no XML of its own (TCG's CPU is
    # "maximum", KVM's the host's), checked before the start (virt/domain.py).
    cpu_level: str | None = None
    # A second NIC on a private link to another guest (a topology); None: the user NIC only.
    link: PrivateLink | None = None

    def __post_init__(self) -> None:
        if not self.name.startswith(NAME_PREFIX):
            raise DomainError(f"domain name {self.name!r} must start with {NAME_PREFIX!r}")
        if self.share not in SHARE_CHOICES:
            raise DomainError(f"unknown share kind {self.share!r}: use one of {SHARE_CHOICES}")
        if self.firmware not in FIRMWARES:
            raise DomainError(f"unknown firmware {self.firmware!r}: use one of {FIRMWARES}")
        if self.accel not in ACCELS:
            raise DomainError(f"unknown accel {self.accel!r}: use one of {ACCELS}")
        if self.share == "virtiofs" and self.ids != "passthrough":
            raise DomainError(
                "virtiofs cannot map guest ids on this host's stack: share /code over 9p "
                "(mapped), or opt in with --devbox-code-ids=passthrough"
            )


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


def _os(parent: ET.Element, firmware: str) -> None:
    if firmware == "uefi":
        # Firmware autoselection (libvirt >= 5.2): an OVMF build for the `pc` machine.
        # Secure boot off: it needs q35 with SMM, and the images boot without it.
        os_ = _sub(parent, "os", firmware="efi")
        _sub(os_, "type", "hvm", arch="x86_64", machine="pc")
        fw = _sub(os_, "firmware")
        _sub(fw, "feature", enabled="no", name="secure-boot")
        _sub(os_, "boot", dev="hd")
        return
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


LINK_HOST = "127.0.0.1"


def _link_interface(devices: ET.Element, link: PrivateLink) -> None:
    iface = _sub(devices, "interface", type="udp")
    _sub(iface, "mac", address=link.mac)
    source = _sub(iface, "source", address=LINK_HOST, port=str(link.peer_port))
    _sub(source, "local", address=LINK_HOST, port=str(link.local_port))
    _sub(iface, "model", type="virtio")
    _sub(iface, "rom", enabled="no")


def set_link_ports(root: ET.Element, link: PrivateLink) -> None:
    """Point the udp interface of a domain XML (a save's) at `link`'s ports."""
    source = root.find("devices/interface[@type='udp']/source")
    local = None if source is None else source.find("local")
    if source is None or local is None:
        raise DomainError("the saved guest has no private link NIC: its save key is wrong")
    source.set("port", str(link.peer_port))
    local.set("port", str(link.local_port))


def _accessmode(share: str, ids: str, qemu_is_root: bool) -> str:
    if share == "9p" and ids == "mapped":
        # QEMU keeps the guest's owner, mode and device numbers in user.virtfs.* xattrs:
        # the host file is QEMU's user's with a plain mode, never setuid or a device node.
        return "mapped"
    # Passthrough (opted in). 9p served by a QEMU that is not root cannot chown what the
    # guest creates: squash ignores the chown, so writes belong to QEMU's user, the
    # caller (virt/qemu_user.py). virtiofsd is started by libvirt as root: passthrough works.
    return "passthrough" if qemu_is_root or share == "virtiofs" else "squash"


def _filesystem(devices: ET.Element, spec: DomainSpec) -> None:
    mode = _accessmode(spec.share, spec.ids, spec.qemu_is_root)
    fs = _sub(devices, "filesystem", type="mount", accessmode=mode)
    if spec.share == "virtiofs":
        # libvirt finds virtiofsd itself through /usr/share/qemu/vhost-user/*.json.
        _sub(fs, "driver", type="virtiofs")
    _sub(fs, "source", dir=str(spec.code_dir))
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
    if spec.link is not None:
        _link_interface(devices, spec.link)
    if spec.share != "sync":
        _filesystem(devices, spec)
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
    _os(root, spec.firmware)
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

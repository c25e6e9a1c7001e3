"""The host's virtualisation stack: libvirt, QEMU and virtiofsd versions, and what they allow.

Two things depend on versions, each found in the projects' sources:

- virtiofs_restore: saving a guest with a virtiofs device (and restoring it) needs
  * QEMU >= 8.2: hw/virtio/vhost-user-fs.c got the "vhost-user-fs-backend" VMState
    subsection (commit 2880e676, "vhost-user-fs: Implement internal migration"); before,
    the device was unmigratable;
  * a virtiofsd that can hand its state to QEMU: the Rust virtiofsd >= 1.11.0 (its
    merge request !206 "Migration"), which lists "migrate-precopy" in
    `--print-capabilities`. The C virtiofsd (QEMU <= 7.2) never could;
  * libvirt >= 10.5.0: qemuMigrationSrcIsAllowed (also run for `virsh save`) refused
    every virtiofs device ("migration with virtiofs device is not supported") until
    it let one through whose virtiofsd lists "migrate-precopy".
- id_mapping: guest ids on a virtiofs /code mapped to the caller. libvirt (>= 10.0)
  passes `<idmap>` to virtiofsd as --uid-map/--gid-map, but virtiofsd refuses those
  when it runs as root ("uid_map can only be used by unprivileged user", sandbox.rs),
  and libvirt's system daemon starts it as root. So it works only where libvirt's
  daemon is not root: qemu:///session, libvirt >= 10.0 (which maps guest root to the
  caller and the other ids to /etc/subuid on its own), a Rust virtiofsd (--uid-map:
  1.6.0 and later) and newuidmap.

Probes only; `devbox doctor` says what they mean, guest/restore.py asks `virtiofs_restore`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .probes import find_virtiofsd

# libvirt and QEMU encode versions as major * 1_000_000 + minor * 1_000 + micro.
QEMU_VIRTIOFS_MIGRATION = (8, 2, 0)
LIBVIRT_VIRTIOFS_MIGRATION = (10, 5, 0)
VIRTIOFSD_MIGRATION = (1, 11, 0)
LIBVIRT_SESSION_IDMAP = (10, 0, 0)
VIRTIOFSD_UID_MAP = (1, 6, 0)
# Where libvirt looks for a virtiofsd's vhost-user description (docs/interop/vhost-user.json).
VHOST_USER_DIRS = ("/etc/qemu/vhost-user", "/usr/share/qemu/vhost-user")
_VERSION = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")

Version = tuple[int, int, int]


def decode(encoded: int) -> Version:
    """libvirt's integer version (getLibVersion, getVersion) as (major, minor, micro)."""
    return (encoded // 1_000_000, encoded // 1_000 % 1_000, encoded % 1_000)


def parse_version(text: str) -> Version | None:
    """The first dotted version in `text` ("virtiofsd 1.13.2" -> (1, 13, 2))."""
    m = _VERSION.search(text)
    if m is None:
        return None
    return (int(m[1]), int(m[2]), int(m[3] or 0))


def show(v: Version | None) -> str:
    return "unknown" if v is None else ".".join(map(str, v))


@dataclass(frozen=True)
class Virtiofsd:
    """The virtiofsd libvirt would start."""

    path: str | None
    kind: str  # "rust" | "c" | "none"
    version: Version | None
    features: tuple[str, ...] = ()  # from --print-capabilities (Rust) or its JSON

    def describe(self) -> str:
        if self.path is None:
            return "none"
        name = {"rust": "Rust virtiofsd", "c": "C virtiofsd (QEMU's)"}.get(self.kind, "virtiofsd")
        return f"{name} {show(self.version)} at {self.path}"


@dataclass(frozen=True)
class Stack:
    """Versions of the host stack and the rules over them."""

    libvirt: Version | None
    qemu: Version | None
    virtiofsd: Virtiofsd
    session: bool = False  # the libvirt daemon runs as the user (qemu:///session)

    def restore_problem(self) -> str | None:
        """Why a virtiofs guest cannot be saved and restored here, or None."""
        missing = []
        if self.qemu is None or self.qemu < QEMU_VIRTIOFS_MIGRATION:
            missing.append(f"QEMU {show(self.qemu)} (needs >= {show(QEMU_VIRTIOFS_MIGRATION)})")
        vfsd = self.virtiofsd
        if vfsd.kind != "rust" or vfsd.version is None or vfsd.version < VIRTIOFSD_MIGRATION:
            missing.append(
                f"{vfsd.describe() if vfsd.path else 'no virtiofsd'} (needs the Rust "
                f"virtiofsd >= {show(VIRTIOFSD_MIGRATION)})"
            )
        elif vfsd.features and "migrate-precopy" not in vfsd.features:
            missing.append(f"{vfsd.describe()} does not offer migrate-precopy")
        if self.libvirt is None or self.libvirt < LIBVIRT_VIRTIOFS_MIGRATION:
            missing.append(
                f"libvirt {show(self.libvirt)} (needs >= {show(LIBVIRT_VIRTIOFS_MIGRATION)})"
            )
        return "; ".join(missing) or None

    @property
    def virtiofs_restore(self) -> bool:
        return self.restore_problem() is None

    def id_mapping_problem(self) -> str | None:
        """Why guest ids on a virtiofs /code cannot be mapped to the caller, or None."""
        if not self.session:
            return (
                "libvirt's system daemon starts virtiofsd as root, and virtiofsd maps ids "
                "only when it is not root (qemu:///session with libvirt >= "
                f"{show(LIBVIRT_SESSION_IDMAP)} would)"
            )
        if self.libvirt is None or self.libvirt < LIBVIRT_SESSION_IDMAP:
            return f"libvirt {show(self.libvirt)} (needs >= {show(LIBVIRT_SESSION_IDMAP)})"
        vfsd = self.virtiofsd
        if vfsd.kind != "rust" or vfsd.version is None or vfsd.version < VIRTIOFSD_UID_MAP:
            return f"{vfsd.describe()} (needs the Rust virtiofsd >= {show(VIRTIOFSD_UID_MAP)})"
        if shutil.which("newuidmap") is None:
            return "no newuidmap (install the uidmap package)"
        return None

    @property
    def id_mapping(self) -> bool:
        return self.id_mapping_problem() is None

    def describe(self) -> str:
        return f"libvirt {show(self.libvirt)}, QEMU {show(self.qemu)}, {self.virtiofsd.describe()}"

    def restore_line(self) -> str:
        """One line: whether virtiofs guests restore here, and if not what would."""
        problem = self.restore_problem()
        if problem is None:
            return "virtiofs guests restore from save slots"
        return (
            f"virtiofs guests boot in full: {problem}. They restore with QEMU >= "
            f"{show(QEMU_VIRTIOFS_MIGRATION)}, the Rust virtiofsd >= "
            f"{show(VIRTIOFSD_MIGRATION)} and libvirt >= {show(LIBVIRT_VIRTIOFS_MIGRATION)} "
            "(Debian 13 has them)"
        )

    def idmap_line(self) -> str:
        problem = self.id_mapping_problem()
        if problem is None:
            return "virtiofs guest ids are mapped to the caller (libvirt <idmap>)"
        return f"virtiofs guest ids are not mapped: {problem}"


def probe_virtiofsd(path: str | None = None) -> Virtiofsd:
    """Which virtiofsd this host has, Rust or C, its version and features."""
    path = path or vhost_user_binary() or find_virtiofsd()
    if path is None:
        return Virtiofsd(None, "none", None)
    out = _run([path, "--version"])
    # The Rust daemon prints "virtiofsd 1.13.2"; QEMU's C daemon prints "virtiofsd
    # version 7.2.x" (its own version is QEMU's) and has no --print-capabilities.
    if "virtiofsd version" in out or "using FUSE kernel interface" in out:
        return Virtiofsd(path, "c", parse_version(out))
    caps = _capabilities(_run([path, "--print-capabilities"]))
    return Virtiofsd(path, "rust", parse_version(out), caps)


def vhost_user_binary(dirs: tuple[str, ...] = VHOST_USER_DIRS) -> str | None:
    """The virtiofsd libvirt picks: the first "fs" description in its vhost-user dirs."""
    for d in dirs:
        for desc in sorted(Path(d).glob("*.json")) if os.path.isdir(d) else []:
            try:
                data = json.loads(desc.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and data.get("type") == "fs" and data.get("binary"):
                binary = str(data["binary"])
                if os.access(binary, os.X_OK):
                    return binary
    return None


def _capabilities(text: str) -> tuple[str, ...]:
    try:
        data = json.loads(text)
    except ValueError:
        return ()
    features = data.get("features", []) if isinstance(data, dict) else []
    return tuple(str(f) for f in features)


def _run(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return r.stdout + r.stderr


def probe(lib_version: int, qemu_version: int, uri: str) -> Stack:
    """The stack behind a libvirt connection (its getLibVersion and getVersion)."""
    return Stack(
        libvirt=decode(lib_version) if lib_version else None,
        qemu=decode(qemu_version) if qemu_version else None,
        virtiofsd=probe_virtiofsd(),
        session=uri.rstrip("/").endswith("/session"),
    )

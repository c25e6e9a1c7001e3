"""Which user QEMU runs as for a devbox guest, and whether that user reaches our files.

libvirt's system daemon runs QEMU as its own user by default (Debian and Ubuntu:
libvirt-qemu; Fedora: qemu), and that user cannot traverse a private home (0750 on
Ubuntu, 0700 on Fedora) where the cache and the code dir live. Rather than keep disks
outside the home or ask for ACLs on it, a devbox guest carries a per-domain DAC label
that runs its QEMU as the calling user, as qemu:///session and Lima do: it reaches
exactly what the user reaches, and 9p writes into /code belong to the user. The
`libvirt` policy keeps libvirt's user instead (for hosts whose rules forbid it).
"""

from __future__ import annotations

import grp
import os
import pwd
import shlex
import stat
import struct
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

POLICIES = ("caller", "libvirt")


@dataclass(frozen=True)
class QemuIdentity:
    """The uid/gid QEMU runs as for our guests, and the label that makes it so."""

    uid: int
    gid: int
    label: tuple[int, int] | None  # a per-domain DAC label, or None for libvirt's user

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    @property
    def name(self) -> str:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return str(self.uid)

    def describe(self) -> str:
        how = "you, by a per-domain label" if self.label else "libvirt's configured user"
        if self.label and self.gid != os.getgid():
            how += f", in group {_group_name(self.gid)}, which libvirt's domain dirs belong to"
        return f"{self.name} (uid {self.uid}, gid {self.gid}; {how})"

    def reach_problem(
        self, paths: Iterable[Path], own: Iterable[Path] = ()
    ) -> tuple[str, str] | None:
        """(what stops QEMU from reaching one of ``paths``, the fix), or None. The
        directories in ``own`` (this session's run dir: new each session) are made
        searchable for QEMU here, so the fix names only stable directories."""
        for d in own:
            self.grant_search(d)
        for path in paths:
            blocked = unreachable_dirs(path, self.uid, self.gid)
            if blocked:
                return (
                    f"QEMU runs as {self.describe()} and cannot reach {blocked[0]} (on the "
                    f"way to {path})",
                    "run QEMU as yourself (devbox_qemu_user = caller, the default), or let "
                    f"{self.name} search these directories once: setfacl -m "
                    f"u:{self.name}:x {' '.join(shlex.quote(str(b)) for b in blocked)}",
                )
        return None

    def grant_search(self, directory: Path) -> None:
        """Let QEMU's user traverse ``directory`` (ours): an ACL entry for it alone where
        the filesystem has ACLs, else mode 0711 (list it: nobody; enter it: anyone)."""
        if self.uid == os.getuid() or self.is_root:
            return
        try:
            st = directory.stat()
            if st.st_uid != os.getuid() or not stat.S_ISDIR(st.st_mode):
                return
            if _can(directory, st, self.uid, groups_of(self.uid, self.gid), 1):
                return
            try:
                os.setxattr(directory, _ACL_XATTR, _search_acl(st.st_mode, self.uid))
            except OSError:
                os.chmod(directory, stat.S_IMODE(st.st_mode) | 0o711)
        except OSError:
            return  # the reach check that follows says what is wrong


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def is_local(uri: str) -> bool:
    """Whether ``uri`` names this host's libvirt (no host part): only then do our uid
    and our files mean anything to the QEMU it starts."""
    return not urlsplit(uri).netloc


def default_identity(capabilities_xml: str) -> tuple[int, int] | None:
    """libvirt's configured QEMU user, from the DAC base label in its capabilities."""
    root = ET.fromstring(capabilities_xml)
    for model in root.findall("host/secmodel"):
        if model.findtext("model") != "dac":
            continue
        for base in model.findall("baselabel"):
            uid, _, gid = (base.text or "").partition(":")
            try:
                return int(uid.lstrip("+")), int(gid.lstrip("+"))
            except ValueError:
                continue
    return None


def identity(conn: Any, uri: str, policy: str = "caller") -> QemuIdentity:
    """Who QEMU will run as for a guest started through ``conn`` under ``policy``."""
    configured = default_identity(conn.getCapabilities())
    base = configured or (0, 0)
    me = (os.getuid(), os.getgid())
    if policy == "caller" and is_local(uri) and base != me:
        # Never root's group: only a real QEMU group (from the DAC base label) is taken.
        gid = label_gid(*me, base[1]) if configured and base[1] != 0 else me[1]
        return QemuIdentity(me[0], gid, label=(me[0], gid))
    return QemuIdentity(*base, label=None)


def label_gid(uid: int, gid: int, qemu_gid: int) -> int:
    """The group of our per-domain label: the caller's own, unless the caller is not
    in libvirt's QEMU group. libvirt makes each domain's private directory (its
    master key, monitor sockets) as its configured user and group, mode 0750, so a
    QEMU running as a user in `libvirt` alone could not enter it; with that group as
    its primary one it can, and keeps the user's own groups as supplementary ones.
    What QEMU creates (overlays, 9p files under /code) is then the user's, in that group."""
    return gid if qemu_gid in groups_of(uid, gid) else qemu_gid


# POSIX ACL xattr entries (linux/posix_acl_xattr.h): tag, permissions, id.
_ACL_XATTR = "system.posix_acl_access"
_ACL_ENTRY = struct.Struct("<HHI")
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20


def _acl(path: Path) -> list[tuple[int, int, int]] | None:
    try:
        raw = os.getxattr(path, _ACL_XATTR)
    except OSError:
        return None  # no ACL beyond the mode bits (or no xattr support)
    return [_ACL_ENTRY.unpack_from(raw, off) for off in range(4, len(raw), _ACL_ENTRY.size)]


def _can(path: Path, st: os.stat_result, uid: int, gids: set[int], bit: int) -> bool:
    """Whether ``uid`` (with ``gids``) has ``bit`` (r=4, w=2, x=1) on ``path``: the
    kernel's check, ACL included (setfacl is the usual fix for a private home)."""
    if uid == 0:
        return True
    if st.st_uid == uid:
        return bool(st.st_mode & (bit << 6))
    entries = _acl(path)
    if entries:
        mask = next((perm for tag, perm, _ in entries if tag == _MASK), 7)
        if any(tag == _USER and who == uid for tag, _, who in entries):
            return any(t == _USER and w == uid and p & mask & bit for t, p, w in entries)
        groups = [
            perm
            for tag, perm, who in entries
            if (tag == _GROUP_OBJ and st.st_gid in gids) or (tag == _GROUP and who in gids)
        ]
        if groups:
            return any(perm & mask & bit for perm in groups)
        return any(tag == _OTHER and perm & bit for tag, perm, _ in entries)
    if st.st_gid in gids:
        return bool(st.st_mode & (bit << 3))
    return bool(st.st_mode & bit)


def groups_of(uid: int, gid: int) -> set[int]:
    """The groups a process of ``uid`` gets from libvirt: its gid and supplementary ones."""
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return {gid}
    return {gid, *(g.gr_gid for g in grp.getgrall() if name in g.gr_mem)}


def unreachable(path: Path, uid: int, gid: int) -> Path | None:
    """The first directory on the way to ``path`` (itself included) that ``uid`` cannot
    search, or None when QEMU running as ``uid`` reaches it."""
    blocked = unreachable_dirs(path, uid, gid)
    return blocked[0] if blocked else None


def unreachable_dirs(path: Path, uid: int, gid: int) -> list[Path]:
    """Every directory on the way to ``path`` (itself included) that ``uid`` cannot
    search: what one setfacl must name."""
    gids = groups_of(uid, gid)
    path = path.resolve()
    blocked: list[Path] = []
    for d in [*reversed(path.parents), path]:
        try:
            st = d.stat()
        except FileNotFoundError:
            break  # nothing further to reach yet
        except OSError:
            blocked.append(d)
            break
        if stat.S_ISDIR(st.st_mode) and not _can(d, st, uid, gids, 1):
            blocked.append(d)
    return blocked


def _search_acl(mode: int, uid: int) -> bytes:
    """An access ACL: the mode's owner, group and other bits, plus search for ``uid``."""
    none = 0xFFFFFFFF  # ACL_UNDEFINED_ID
    entries = [
        (_USER_OBJ, (mode >> 6) & 7, none),
        (_USER, 1, uid),
        (_GROUP_OBJ, (mode >> 3) & 7, none),
        (_MASK, ((mode >> 3) & 7) | 1, none),
        (_OTHER, mode & 7, none),
    ]
    return struct.pack("<I", 2) + b"".join(_ACL_ENTRY.pack(*e) for e in entries)

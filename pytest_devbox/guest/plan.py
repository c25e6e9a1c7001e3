"""What starting one guest decides before it asks libvirt: its image, run directory,
name, domain XML, who runs its QEMU, its deadline and how to reach it over SSH.

Shared by a boot and a restore (boot.py), so the two can never disagree about what a
guest of a profile looks like.
"""

from __future__ import annotations

import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt

from ..config.code_ids import CodeShare, code_share
from ..config.profiles import Profile
from ..config.settings import DEFAULT_CODE_IDS
from ..errors import HostNotReady
from ..host import cpu_level, owner
from ..host.layout import CacheLayout
from ..host.probes import resolve_accel
from ..image.cache import ImageCache, ImageInfo
from ..log import Log
from ..transport.keys import ensure_keypair
from ..transport.ssh import Connection
from ..virt import domain_xml
from ..virt.admission import admitted
from ..virt.qemu_user import QemuIdentity, is_local
from ..virt.qemu_user import identity as qemu_identity
from .sweep import claim_run_dir

# Deadlines for the whole boot (all phases together). Software emulation is 5-10x slower.
BOOT_TIMEOUT = {"kvm": 120.0, "tcg": 420.0}


def new_run_id() -> str:
    return uuid.uuid4().hex[:8]


@dataclass(frozen=True)
class Plan:
    """One guest of ``profile`` about to start: everything but the libvirt calls."""

    profile: Profile
    cache: ImageCache
    image: ImageInfo
    code_dir: Path
    accel: str  # resolved: kvm or tcg
    run_id: str
    workdir: Path  # this session's run dir: overlays and console logs
    share: str  # how /code reaches the guest: the profile's or --devbox-share's, made safe
    code: CodeShare  # that share, its guest-id mode and why (config/code_ids.py)

    @classmethod
    def make(
        cls,
        profile: Profile,
        cache: ImageCache,
        code_dir: Path,
        *,
        accel: str,
        run_id: str | None,
        rebuild: bool,
        share: str = "",
        code_ids: str = DEFAULT_CODE_IDS,
    ) -> Plan:
        code_dir = Path(code_dir).resolve()
        if not code_dir.is_dir():
            raise HostNotReady(f"code dir {code_dir} does not exist: pass an existing directory")
        chosen = resolve_accel(accel)
        if chosen == "kvm":  # before any image is built: the guest could not run anyway
            problem = cpu_level.kvm_problem(profile.name, profile.cpu_level)
            if problem is not None:
                raise HostNotReady(problem)
        image = cache.image_for(profile, rebuild=rebuild)
        run_id = run_id or new_run_id()
        workdir = claim_run_dir(cache.root, run_id)
        code = code_share(profile, share, code_ids)
        return cls(profile, cache, image, code_dir, chosen, run_id, workdir, code.share, code)

    @property
    def memory_lock(self) -> Path:
        return CacheLayout(self.cache.root).memory_lock

    def admitted(
        self, virconn: libvirt.virConnect, timeout: float, log: Log
    ) -> AbstractContextManager[None]:
        """Held around the libvirt call that creates this guest: its memory fits."""
        p = self.profile
        return admitted(
            virconn, p.memory_mib, self.memory_lock, label=p.name, log=log, timeout=timeout
        )

    def new_name(self) -> str:
        # Unique per machine, kept or not: a session may start several of one distro.
        return f"{domain_xml.NAME_PREFIX}{self.profile.name}-{self.run_id}-{uuid.uuid4().hex[:4]}"

    def deadline_seconds(self, boot_timeout: float | None) -> float:
        return boot_timeout or BOOT_TIMEOUT[self.accel]

    def spec(
        self,
        name: str,
        disk: Path,
        console: Path,
        qemu: QemuIdentity,
        *,
        keep: bool,
        link: domain_xml.PrivateLink | None = None,
    ) -> domain_xml.DomainSpec:
        p = self.profile
        return domain_xml.DomainSpec(
            name=name,
            disk=disk,
            code_dir=self.code_dir,
            share=self.share,
            accel=self.accel,
            memory_mib=p.memory_mib,
            vcpus=p.vcpus,
            console_log=console,
            metadata=self._metadata(disk, keep),
            run_as=qemu.label,
            qemu_is_root=qemu.is_root,
            ids=self.code.ids,
            firmware=p.firmware,
            cpu_level=p.cpu_level,
            link=link,
        )

    def _metadata(self, disk: Path, keep: bool) -> dict[str, str]:
        """What the sweep and `devbox ls` need to tell whose guest this is."""
        return {
            "owner_pid": str(os.getpid()),
            "owner_host": socket.gethostname(),
            # What the sweep, the reaper and a restore's leftover check trust (owner.py).
            "owner": owner.me().token,
            "run_id": self.run_id,
            "started": str(int(time.time())),
            "distro": self.profile.name,
            "overlay": str(disk),
            "image_key": self.image.key,
            "keep": "1" if keep else "0",
            # How /code reaches it: a process attaching later (--devbox-reuse) syncs a
            # copy, not a share.
            "share": self.share,
        }

    def reached_paths(self, *paths: Path) -> list[Path]:
        """What QEMU must be able to open: `paths`, and the code dir when it is shared
        (a sync guest's /code is a copy: QEMU never opens the directory)."""
        return [*paths] if self.share == "sync" else [*paths, self.code_dir]

    def connection(self, port: int) -> Connection:
        """root's SSH connection to this guest on a port forwarded on our loopback (not
        yet connected); sites.Link reaches a remote host's."""
        return guest_connection(self.cache.root, port, host_key_alias(self.image))


def guest_connection(
    cache_root: Path,
    port: int,
    alias: str,
    *,
    username: str = "root",
    opener: Opener | None = None,
    via: Sequence[str] = (),
) -> Connection:
    """An SSH connection (not yet connected) to a guest's port forwarded on 127.0.0.1 of
    the host running it, with our key and the host key pinned under `alias`; `opener`
    and `via` when that loopback is another host's (sites.Link)."""
    layout = CacheLayout(cache_root)
    return Connection(
        "127.0.0.1",
        port,
        username=username,
        key_path=ensure_keypair(layout.ssh),
        known_hosts=layout.known_hosts,
        host_key_alias=alias,
        opener=opener,
        via=via,
    )


def qemu_for(
    virconn: libvirt.virConnect, uri: str, policy: str, paths: list[Path], run_dir: Path
) -> QemuIdentity:
    """Who runs this guest's QEMU; HostNotReady naming the directory it cannot reach.
    `run_dir` (ours, new each session) is made searchable for QEMU when it needs that."""
    qemu = qemu_identity(virconn, uri, policy)
    problem = qemu.reach_problem(paths, own=[run_dir]) if is_local(uri) else None
    if problem:  # said plainly now, rather than as libvirt's "Permission denied"
        raise HostNotReady(f"{problem[0]}: {problem[1]}")
    return qemu


def host_key_alias(image: ImageInfo) -> str:
    """The name the guest's host key is pinned under: one per image build, since host
    keys are made when the image is built and ports change on every boot."""
    built = re.sub(r"[^0-9A-Za-z]", "", str(image.metadata.get("built_at", "")))
    return f"devbox-{image.path.stem}-{built}"


def tail_file(path: Path, lines: int) -> str:
    """The last ``lines`` of a console log, readable (no CRs), '' if there is none."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            data = f.read()
    except OSError:
        return ""
    return tail_text(data, lines)


def tail_text(data: bytes, lines: int) -> str:
    """The last ``lines`` of console output, readable (no CRs)."""
    # Serial consoles emit CR LF and escape sequences; keep it readable.
    text = data.decode("utf-8", "replace").replace("\r", "")
    return "\n".join(text.splitlines()[-lines:])


Opener = Callable[[float], Any]  # a timeout -> a connected socket-like object

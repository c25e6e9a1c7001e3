"""Machine: one running guest (transient domain + SSH connection + /code share).

The handle tests and the `devbox` command get. Usable without pytest:

    with Machine.start(profile, cache=ImageCache(root), code_dir=Path.cwd()) as m:
        print(m.run("uname -r").stdout)
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import socket
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Callable

import libvirt

from . import domain as dom
from .boot import Boot, Deadline, wait_ready
from .distros import Profile
from .errors import HostNotReady
from .host import resolve_accel
from .images import ImageCache, ImageInfo
from .paths import CacheLayout
from .restore import Restored, RestoreJob, restore_guest
from .settings import DEFAULT_ACCEL, DEFAULT_URI
from .ssh import Connection, Result, ensure_keypair
from .sweep import claim_run_dir

# Deadlines for the whole boot (all phases together). Software emulation is 5-10x slower.
BOOT_TIMEOUT = {"kvm": 120.0, "tcg": 420.0}


def new_run_id() -> str:
    return uuid.uuid4().hex[:8]


class Machine:
    """A running guest. Create with `Machine.start`; `close()` destroys it."""

    def __init__(
        self,
        *,
        profile: Profile,
        image: ImageInfo,
        virconn: libvirt.virConnect,
        domain: dom.Domain,
        ssh: Connection,
        overlay: Path,
        console_log: Path,
        boot_seconds: float,
        restored: Restored | None = None,
    ) -> None:
        self.profile = profile
        self.image = image
        self._virconn = virconn
        self.domain = domain
        self._ssh = ssh
        self.overlay = overlay
        self.console_log = console_log
        self.boot_seconds = boot_seconds
        self._restored = restored
        self.closed = False

    @property
    def started(self) -> str:
        """How this guest started: "booted" or "restored" (from a saved guest)."""
        return "booted" if self._restored is None else "restored"

    @property
    def distro(self) -> str:
        return self.profile.name

    @property
    def name(self) -> str:
        return self.domain.name

    @property
    def history(self) -> deque[Result]:
        """The most recent commands run in this guest, oldest first."""
        return self._ssh.history

    # ---- starting -------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        profile: Profile,
        *,
        cache: ImageCache,
        code_dir: Path,
        uri: str = DEFAULT_URI,
        accel: str = DEFAULT_ACCEL,
        run_id: str | None = None,
        rebuild: bool = False,
        keep: bool = False,
        boot_timeout: float | None = None,
        log: Callable[[str], None] = print,
    ) -> Machine:
        """Boot `profile` on a fresh overlay of its cached image and wait until it is usable."""
        code_dir = Path(code_dir).resolve()
        if not code_dir.is_dir():
            raise HostNotReady(f"code dir {code_dir} does not exist: pass an existing directory")
        chosen = resolve_accel(accel)
        image = cache.image_for(profile, rebuild=rebuild)
        run_id = run_id or new_run_id()
        workdir = claim_run_dir(cache.root, run_id)
        # Unique per machine, kept or not: a session may start several of one distro.
        name = f"{dom.NAME_PREFIX}{profile.name}-{run_id}-{uuid.uuid4().hex[:4]}"
        overlay = cache.overlay(image.path, workdir / f"{name}.qcow2")
        console = workdir / f"{name}.console.log"
        spec = _domain_spec(profile, image, name, overlay, console, code_dir, chosen, run_id, keep)
        t0 = time.monotonic()
        virconn = dom.connect(uri)
        domain: dom.Domain | None = None
        try:
            domain = dom.Domain.create(virconn, spec, autodestroy=not keep)
            boot = Boot(
                domain,
                profile.name,
                console,
                Deadline(boot_timeout or BOOT_TIMEOUT[chosen]),
                tail_file,
            )
            ssh = wait_ready(boot, connection=_connection_for(cache, image), share=profile.share)
        except BaseException:
            # Half-started is torn down, whatever stopped us (error, Ctrl-C).
            if domain is not None:
                domain.destroy()
            _close_quietly(virconn)
            overlay.unlink(missing_ok=True)
            raise
        seconds = time.monotonic() - t0
        log(f"{profile.name}: ready in {seconds:.1f} s ({chosen}, {profile.share} /code)")
        return cls(
            profile=profile,
            image=image,
            virconn=virconn,
            domain=domain,
            ssh=ssh,
            overlay=overlay,
            console_log=console,
            boot_seconds=seconds,
        )

    @classmethod
    def restore(
        cls,
        profile: Profile,
        *,
        cache: ImageCache,
        code_dir: Path,
        uri: str = DEFAULT_URI,
        accel: str = DEFAULT_ACCEL,
        run_id: str | None = None,
        rebuild: bool = False,
        boot_timeout: float | None = None,
        log: Callable[[str], None] = print,
    ) -> Machine:
        """Like `start`, but restore a saved booted guest of `profile` (saving one first
        when there is none yet). RestoreUnavailable when it cannot: boot instead."""
        code_dir = Path(code_dir).resolve()
        if not code_dir.is_dir():
            raise HostNotReady(f"code dir {code_dir} does not exist: pass an existing directory")
        chosen = resolve_accel(accel)
        image = cache.image_for(profile, rebuild=rebuild)
        run_id = run_id or new_run_id()
        workdir = claim_run_dir(cache.root, run_id)

        def make_spec(name: str, disk: Path, console: Path) -> dom.DomainSpec:
            keep = False  # a restored guest ends with its session (it holds a slot)
            return _domain_spec(profile, image, name, disk, console, code_dir, chosen, run_id, keep)

        t0 = time.monotonic()
        virconn = dom.connect(uri)
        try:
            job = RestoreJob(
                profile=profile,
                virconn=virconn,
                image=image,
                cache_root=cache.root,
                workdir=workdir,
                make_spec=make_spec,
                timeout=boot_timeout or BOOT_TIMEOUT[chosen],
                connection=_connection_for(cache, image),
                tail=tail_file,
                log=log,
            )
            restored = restore_guest(job)
        except BaseException:
            _close_quietly(virconn)
            raise
        seconds = time.monotonic() - t0
        log(f"{profile.name}: restored in {seconds:.1f} s ({chosen}, {profile.share} /code)")
        return cls(
            profile=profile,
            image=image,
            virconn=virconn,
            domain=restored.domain,
            ssh=restored.ssh,
            overlay=restored.overlay,
            console_log=restored.console,
            boot_seconds=seconds,
            restored=restored,
        )

    # ---- using ----------------------------------------------------------------------------

    def run(
        self,
        cmd: str | Sequence[str],
        *,
        check: bool = True,
        timeout: float | None = None,
        cwd: str | None = "/code",
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        stdin: str | bytes | None = None,
    ) -> Result:
        """Run `cmd` in the guest (a shell string, or a list that is quoted for you).

        Raises CommandFailed on a non-zero exit when `check`, CommandTimeout after `timeout`.
        `user="devbox"` runs as the guest user that has the host user's uid and gid.
        """
        return self._ssh.run(
            cmd, check=check, timeout=timeout, cwd=cwd, env=env, user=user, stdin=stdin
        )

    def put(self, local: Path | str, remote: str) -> None:
        """Copy a host file into the guest (SFTP)."""
        self._ssh.put(local, remote)

    def get(self, remote: str, local: Path | str) -> None:
        """Copy a guest file to the host (SFTP)."""
        self._ssh.get(remote, local)

    def ssh_argv(self) -> list[str]:
        """`ssh_command()` as an argument list."""
        return self._ssh.ssh_command()

    def ssh_command(self) -> str:
        """An OpenSSH command line a person can paste to log in to this guest."""
        return shlex.join(self._ssh.ssh_command())

    def console_tail(self, lines: int = 40) -> str:
        return tail_file(self.console_log, lines)

    # ---- stopping -------------------------------------------------------------------------

    def close(self) -> None:
        """Destroy the guest and delete its overlay. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self._ssh.close()
        self.domain.destroy()
        if self._restored is not None:
            self._restored.release()
        _close_quietly(self._virconn)
        self.overlay.unlink(missing_ok=True)

    def detach(self) -> None:
        """Leave the guest running (--devbox-keep): close only our side."""
        self.closed = True
        self._ssh.close()
        _close_quietly(self._virconn)

    def __enter__(self) -> Machine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Machine {self.name} {'closed' if self.closed else 'running'}>"


def host_key_alias(image: ImageInfo) -> str:
    """The name the guest's host key is pinned under: one per image build, since host
    keys are made when the image is built and ports change on every boot."""
    built = re.sub(r"[^0-9A-Za-z]", "", str(image.metadata.get("built_at", "")))
    return f"devbox-{image.path.stem}-{built}"


def tail_file(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    # Serial consoles emit CR LF and escape sequences; keep it readable.
    text = data.replace("\r", "")
    return "\n".join(text.splitlines()[-lines:])


def _close_quietly(virconn: libvirt.virConnect) -> None:
    # Closing a connection that already broke is not worth an error.
    with contextlib.suppress(libvirt.libvirtError):
        virconn.close()


def _domain_spec(
    profile: Profile,
    image: ImageInfo,
    name: str,
    overlay: Path,
    console: Path,
    code_dir: Path,
    accel: str,
    run_id: str,
    keep: bool,
) -> dom.DomainSpec:
    return dom.DomainSpec(
        name=name,
        disk=overlay,
        code_dir=code_dir,
        share=profile.share,
        accel=accel,
        memory_mib=profile.memory_mib,
        vcpus=profile.vcpus,
        console_log=console,
        # What the sweep and `devbox ls` need to tell whose guest this is.
        metadata={
            "owner_pid": str(os.getpid()),
            "owner_host": socket.gethostname(),
            "run_id": run_id,
            "started": str(int(time.time())),
            "distro": profile.name,
            "overlay": str(overlay),
            "image_key": image.key,
            "keep": "1" if keep else "0",
        },
    )


def _connection_for(cache: ImageCache, image: ImageInfo) -> Callable[[int], Connection]:
    def connection(port: int) -> Connection:
        layout = CacheLayout(cache.root)
        return Connection(
            "127.0.0.1",
            port,
            key_path=ensure_keypair(layout.ssh),
            known_hosts=layout.known_hosts,
            host_key_alias=host_key_alias(image),
        )

    return connection

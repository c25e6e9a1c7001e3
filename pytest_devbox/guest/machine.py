"""Machine: one running guest (transient domain + SSH connection + /code share or copy).

The handle tests and the `devbox` command get. Usable without pytest:

    with Machine.start(profile, cache=ImageCache(root), code_dir=Path.cwd()) as m:
        print(m.run("uname -r").stdout)
"""

from __future__ import annotations

import shlex
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from ..config.profiles import Profile
from ..config.settings import (
    DEFAULT_ACCEL,
    DEFAULT_CODE_IDS,
    DEFAULT_EXEC,
    DEFAULT_QEMU_USER,
    DEFAULT_REMOTE_POOL,
    DEFAULT_URI,
)
from ..errors import DomainError
from ..image.cache import ImageCache
from ..log import Log
from ..result import Result
from ..transport.exec_channel import OUTPUT_LIMIT
from ..transport.logins import Logins
from ..virt.domain_xml import PrivateLink
from . import boot
from .boot import Launch, close_quietly
from .parts import GuestParts
from .sync import CodeSync, SyncSummary


class Machine:
    """A running guest. Create with `Machine.start`; `close()` destroys it."""

    def __init__(
        self,
        parts: GuestParts,
        *,
        exec_mode: str = DEFAULT_EXEC,
        log: Log = print,
        sync_exclude: Sequence[str] = (),
    ) -> None:
        self.profile = parts.profile
        self.share = parts.share or parts.profile.share
        """How /code reaches this guest: "virtiofs" or "9p" (shared) or "sync" (a copy)."""
        self.image = parts.image
        self._virconn = parts.virconn
        self.domain = parts.domain
        self._logins = Logins(parts.ssh, exec_mode, log)
        self._files = parts.files
        self.overlay = parts.files.overlay
        self.console_log = parts.files.console
        self.boot_seconds = 0.0
        self._restored = parts.restored
        self._site = parts.site
        # USER@HOST:PORT of the remote libvirt host running this guest; None on this host.
        self.remote = parts.site.remote.describe() if parts.site and parts.site.remote else None
        # Started without AUTODESTROY (keep, keep-failed): `keep()` may leave it running.
        self.keepable = parts.keepable
        self._reaper = parts.reaper  # watches a keepable guest until it is kept or destroyed
        self.closed = False
        self.address: str | None = None
        """Its address on its topology's private network (guest/topology.py); else None."""
        self._testinfra: dict[str | None, Any] = {}
        self._code: CodeSync | None = None
        if self.share == "sync":
            if parts.code_dir is None:
                raise ValueError("a guest with share 'sync' needs the code dir to copy")
            self._code = CodeSync(
                parts.code_dir,
                sync_exclude,
                user=lambda: self._logins.login_for(None)[0].conn,
                root=lambda: self._logins.root.conn,
                label=parts.profile.name,
                log=log,
            )

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
        return self._logins.history

    @property
    def testinfra(self) -> Any:
        """A pytest-testinfra `Host` on this guest as the devbox user, over this handle's
        logins (no SSH connection of its own); `testinfra_as("root")` for root, or use
        testinfra's `host.sudo()`. Needs `pip install 'pytest-devbox[testinfra]'`."""
        return self.testinfra_as(None)

    def testinfra_as(self, user: str | None) -> Any:
        """`testinfra` as `user` (None: devbox; "root"; another name through sudo)."""
        if user not in self._testinfra:
            from .testinfra import host_for  # testinfra is an optional extra

            self._testinfra[user] = host_for(self, user)
        return self._testinfra[user]

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
        qemu_user: str = DEFAULT_QEMU_USER,
        run_id: str | None = None,
        rebuild: bool = False,
        keep: bool = False,
        keepable: bool = False,
        boot_timeout: float | None = None,
        exec_mode: str = DEFAULT_EXEC,
        log: Log = print,
        share: str = "",
        sync_exclude: Sequence[str] = (),
        code_ids: str = DEFAULT_CODE_IDS,
        remote_pool: str = DEFAULT_REMOTE_POOL,
        link: PrivateLink | None = None,
    ) -> Machine:
        """Boot `profile` on a fresh overlay of its cached image and wait until it is usable.

        `share` overrides the profile's ("sync": no device, /code copied over SSH and
        refreshed by `sync()`, skipping files matching the gitignore-style `sync_exclude`).
        `keepable`: no AUTODESTROY, reaped if we die, so `keep()` may leave it up. On a
        remote `uri`: share "sync", disk and console in our pool at `remote_pool` there.
        The sequence itself is boot.py's.
        """
        launch = Launch(
            uri=uri, accel=accel, qemu_user=qemu_user, run_id=run_id, rebuild=rebuild,
            keep=keep, keepable=keepable, boot_timeout=boot_timeout, share=share,
            remote_pool=remote_pool, code_ids=code_ids, link=link, log=log,
        )  # fmt: skip
        parts = boot.boot(profile, cache, code_dir, launch)
        machine = cls(parts, exec_mode=exec_mode, log=log, sync_exclude=sync_exclude)
        return machine._ready(parts, "ready", log)

    @classmethod
    def restore(
        cls,
        profile: Profile,
        *,
        cache: ImageCache,
        code_dir: Path,
        uri: str = DEFAULT_URI,
        accel: str = DEFAULT_ACCEL,
        qemu_user: str = DEFAULT_QEMU_USER,
        run_id: str | None = None,
        rebuild: bool = False,
        boot_timeout: float | None = None,
        exec_mode: str = DEFAULT_EXEC,
        log: Log = print,
        share: str = "",
        sync_exclude: Sequence[str] = (),
        code_ids: str = DEFAULT_CODE_IDS,
        link: PrivateLink | None = None,
    ) -> Machine:
        """Like `start`, but restore a saved booted guest of `profile` (saving one first
        when there is none yet). RestoreUnavailable when it cannot: boot instead."""
        launch = Launch(
            uri=uri, accel=accel, qemu_user=qemu_user, run_id=run_id, rebuild=rebuild,
            boot_timeout=boot_timeout, share=share, code_ids=code_ids, link=link, log=log,
        )  # fmt: skip
        parts = boot.restore(profile, cache, code_dir, launch)
        machine = cls(parts, exec_mode=exec_mode, log=log, sync_exclude=sync_exclude)
        return machine._ready(parts, "restored", log)

    def _ready(self, parts: GuestParts, verb: str, log: Log) -> Machine:
        """The first copy of /code (share "sync"), then the time it all took, logged."""
        self._first_copy()
        self.boot_seconds = seconds = time.monotonic() - parts.began
        log(f"{self.distro}: {verb} in {seconds:.1f} s ({parts.accel}, {parts.share} /code)")
        return self

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
        output_limit: int | None = OUTPUT_LIMIT,
    ) -> Result:
        """Run `cmd` in the guest (a shell string, or a list that is quoted for you).

        Raises CommandFailed on a non-zero exit when `check`, CommandTimeout after `timeout`.
        It runs as the guest user `devbox`, who has your uid and gid (so what it writes
        into /code is yours); `user="root"` runs it as root, another name through sudo.
        Each of stdout and stderr keeps `output_limit` bytes (64 MiB; None: all): its
        head and tail around a "... N bytes dropped ..." line.
        """
        return self._logins.run(
            cmd,
            check=check,
            timeout=timeout,
            cwd=cwd,
            env=env,
            user=user,
            stdin=stdin,
            output_limit=output_limit,
        )

    def put(self, local: Path | str, remote: str, *, user: str | None = None) -> None:
        """Copy a host file into the guest (SFTP), as `devbox` or `user="root"`."""
        self._logins.put(local, remote, user)

    def get(self, remote: str, local: Path | str, *, user: str | None = None) -> None:
        """Copy a guest file to the host (SFTP), as `devbox` or `user="root"`."""
        self._logins.get(remote, local, user)

    def ssh_argv(self) -> list[str]:
        """`ssh_command()` as an argument list."""
        return self._logins.root.conn.ssh_command()

    def ssh_command(self) -> str:
        """An OpenSSH command line a person can paste to log in to this guest (as root)."""
        return shlex.join(self.ssh_argv())

    def sync(self) -> SyncSummary:
        """Copy what changed in the code dir since the last sync into /code, and remove
        the files an earlier sync copied that are gone from it (never files the guest
        made). For guests with share "sync"; elsewhere /code is the host directory
        itself and this does nothing. One sync at a time; logs one line."""
        if self._code is None:
            return SyncSummary()
        return self._code.sync()

    def _first_copy(self) -> None:
        """A new (or restored) sync guest's first copy of the code dir; a guest whose
        copy fails is torn down, like one that did not boot."""
        if self._code is None:
            return
        try:
            self._code.sync()
        except BaseException:
            self.close()
            raise

    def stop_commands(self) -> None:
        """End every command still running through this handle's executors (one that
        pytest-timeout interrupted goes on otherwise, and may have left a frame half
        sent): each executor is closed, which ends its commands in the guest, and the
        next command starts a new one. Commands over plain SSH are left to finish."""
        self._logins.stop_executors()

    def console_tail(self, lines: int = 40) -> str:
        return self._files.tail(lines)

    # ---- stopping -------------------------------------------------------------------------

    def close(self) -> None:
        """Destroy the guest and delete its overlay. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self._logins.close()
        self.domain.destroy()
        if self._reaper is not None:
            self._reaper.forget(self.name)
        if self._restored is not None:
            self._restored.release()
        self._files.remove()
        if self._site is not None:
            self._site.close()
        close_quietly(self._virconn)

    def keep(self) -> None:
        """Leave a keepable guest running past this process: marked kept, so the sweep
        spares it and `devbox ls/destroy` treat it as kept; no longer reaped."""
        if not self.keepable or self._restored is not None:
            raise DomainError(f"{self.name} was started to end with its session: not kept")
        meta = self.domain.metadata()
        self.domain.set_metadata({**meta, "keep": "1"})
        if self._reaper is not None:
            self._reaper.forget(self.name)
        self.detach()

    def detach(self) -> None:
        """Leave the guest running (--devbox-keep): close only our side."""
        self.closed = True
        self._logins.close()
        if self._site is not None:
            self._site.close()
        close_quietly(self._virconn)

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

"""Machine: one running guest (transient domain + SSH connection + /code share or copy).

The handle tests and the `devbox` command get. Usable without pytest:

    with Machine.start(profile, cache=ImageCache(root), code_dir=Path.cwd()) as m:
        print(m.run("uname -r").stdout)
"""

from __future__ import annotations

import contextlib
import shlex
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import libvirt

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
from ..image.cache import ImageCache, ImageInfo
from ..result import Result
from ..transport.logins import Logins
from ..transport.ssh import Connection
from ..virt import domain as dom
from ..virt.admission import admitted
from .boot import Log, Plan, create_domain, qemu_for, tail_file
from .readiness import Boot, Deadline, wait_ready
from .reaper import Reaper
from .restore import Restored, RestoreJob, restore_guest
from .sites import GuestFiles, LocalFiles, Reach, Site, site_for
from .sync import CodeSync, SyncSummary


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
        exec_mode: str = DEFAULT_EXEC,
        log: Log = print,
        keepable: bool = False,
        reaper: Reaper | None = None,
        share: str = "",
        code_dir: Path | None = None,
        sync_exclude: Sequence[str] = (),
        files: GuestFiles | None = None,
        site: Reach | None = None,
    ) -> None:
        self.profile = profile
        self.share = share or profile.share
        """How /code reaches this guest: "virtiofs" or "9p" (shared) or "sync" (a copy)."""
        self.image = image
        self._virconn = virconn
        self.domain = domain
        self._logins = Logins(ssh, exec_mode, log)
        self.overlay = overlay
        self.console_log = console_log
        self.boot_seconds = boot_seconds
        self._restored = restored
        self._files = files or LocalFiles(overlay, console_log)
        self._site = site
        # USER@HOST:PORT of the remote libvirt host running this guest; None on this host.
        self.remote = site.remote.describe() if site and site.remote else None
        # Started without AUTODESTROY (keep, keep-failed): `keep()` may leave it running.
        self.keepable = keepable
        self._reaper = reaper  # watches a keepable guest until it is kept or destroyed
        self.closed = False
        self._code: CodeSync | None = None
        if self.share == "sync":
            if code_dir is None:
                raise ValueError("a guest with share 'sync' needs the code dir to copy")
            self._code = CodeSync(
                code_dir,
                sync_exclude,
                user=lambda: self._logins.login_for(None)[0].conn,
                root=lambda: self._logins.root.conn,
                label=profile.name,
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
    ) -> Machine:
        """Boot `profile` on a fresh overlay of its cached image and wait until it is usable.

        `share` overrides the profile's ("sync": no device, /code copied over SSH and
        refreshed by `sync()`, skipping files matching the gitignore-style `sync_exclude`).
        `keepable`: no AUTODESTROY, reaped if we die, so `keep()` may leave it up. On a
        remote `uri`: share "sync", disk and console in our pool at `remote_pool` there.
        """
        plan = Plan.make(
            profile, cache, code_dir, accel=accel, run_id=run_id, rebuild=rebuild, share=share,
            code_ids=code_ids,
        )  # fmt: skip
        log(f"{profile.name}: {plan.code.describe()}")
        name = plan.new_name()
        t0 = time.monotonic()
        virconn = dom.connect(uri)
        domain: dom.Domain | None = None
        reaper = Reaper.for_uri(uri) if keepable and not keep else None
        site: Site | None = None
        files: GuestFiles | None = None
        try:
            # This host, or a remote one (its pool, its loopback through a tunnel).
            site = site_for(plan, uri, virconn, remote_pool, log)
            plan = site.adapt(plan, log)
            files = site.files(name)
            qemu = qemu_for(virconn, uri, qemu_user, plan.reached_paths(files.overlay))
            spec = plan.spec(name, files.overlay, files.console, qemu, keep=keep)
            domain = create_domain(
                virconn, plan, spec, reaper, autodestroy=not (keep or keepable), log=log
            )
            deadline = Deadline(plan.deadline_seconds(boot_timeout))
            boot = Boot(domain, profile.name, files.console, deadline, lambda _, n: files.tail(n))
            ssh = wait_ready(boot, connection=site.connection, share=plan.share, probe=site.probe)
        except BaseException:
            # Half-started is torn down, whatever stopped us (error, Ctrl-C).
            _undo_start(name, virconn, domain, files, site, reaper)
            raise
        machine = cls._planned(
            plan, sync_exclude, virconn=virconn, domain=domain, ssh=ssh, overlay=files.overlay,
            console_log=files.console, exec_mode=exec_mode, log=log, keepable=keep or keepable,
            reaper=reaper, files=files, site=site,
        )  # fmt: skip
        return machine._ready(plan, t0, "ready", log)

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
    ) -> Machine:
        """Like `start`, but restore a saved booted guest of `profile` (saving one first
        when there is none yet). RestoreUnavailable when it cannot: boot instead."""
        plan = Plan.make(
            profile, cache, code_dir, accel=accel, run_id=run_id, rebuild=rebuild, share=share,
            code_ids=code_ids,
        )  # fmt: skip
        log(f"{profile.name}: {plan.code.describe()}")
        t0 = time.monotonic()
        virconn = dom.connect(uri)
        try:
            qemu = qemu_for(virconn, uri, qemu_user, plan.reached_paths(plan.workdir))

            def make_spec(name: str, disk: Path, console: Path) -> dom.DomainSpec:
                # A restored guest ends with its session (it holds a slot): never kept.
                return plan.spec(name, disk, console, qemu, keep=False)

            job = RestoreJob(
                profile=profile,
                share=plan.share,
                virconn=virconn,
                image=plan.image,
                cache_root=cache.root,
                workdir=plan.workdir,
                make_spec=make_spec,
                timeout=plan.deadline_seconds(boot_timeout),
                connection=plan.connection,
                tail=tail_file,
                log=log,
            )
            with admitted(
                virconn, profile.memory_mib, plan.memory_lock, label=profile.name, log=log
            ):
                restored = restore_guest(job)
        except BaseException:
            _close_quietly(virconn)
            raise
        machine = cls._planned(
            plan, sync_exclude, virconn=virconn, domain=restored.domain, ssh=restored.ssh,
            overlay=restored.overlay, console_log=restored.console, restored=restored,
            exec_mode=exec_mode, log=log,
        )  # fmt: skip
        return machine._ready(plan, t0, "restored", log)

    @classmethod
    def _planned(cls, plan: Plan, sync_exclude: Sequence[str], **parts: Any) -> Machine:
        """A Machine of what `plan` decided and the `parts` its start produced."""
        return cls(
            profile=plan.profile,
            image=plan.image,
            boot_seconds=0.0,
            share=plan.share,
            code_dir=plan.code_dir,
            sync_exclude=sync_exclude,
            **parts,
        )

    def _ready(self, plan: Plan, t0: float, verb: str, log: Log) -> Machine:
        """The first copy of /code (share "sync"), then the time it all took, logged."""
        self._first_copy()
        self.boot_seconds = seconds = time.monotonic() - t0
        log(f"{self.distro}: {verb} in {seconds:.1f} s ({plan.accel}, {plan.share} /code)")
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
    ) -> Result:
        """Run `cmd` in the guest (a shell string, or a list that is quoted for you).

        Raises CommandFailed on a non-zero exit when `check`, CommandTimeout after `timeout`.
        It runs as the guest user `devbox`, who has your uid and gid (so what it writes
        into /code is yours); `user="root"` runs it as root, another name through sudo.
        """
        return self._logins.run(
            cmd, check=check, timeout=timeout, cwd=cwd, env=env, user=user, stdin=stdin
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
        _close_quietly(self._virconn)

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


def _undo_start(
    name: str,
    virconn: libvirt.virConnect,
    domain: dom.Domain | None,
    files: GuestFiles | None,
    site: Site | None,
    reaper: Reaper | None,
) -> None:
    """Tear down what a start that failed got as far as making."""
    if domain is not None:
        domain.destroy()
    if files is not None:
        files.remove()
    if site is not None:
        site.close()
    if reaper is not None:
        reaper.forget(name)
    _close_quietly(virconn)


def _close_quietly(virconn: libvirt.virConnect) -> None:
    # Closing a connection that already broke is not worth an error.
    with contextlib.suppress(libvirt.libvirtError):
        virconn.close()

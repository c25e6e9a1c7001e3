"""A session's machines: one shared guest per distro, started lazily, torn down at the end."""

from __future__ import annotations

import contextlib
import os
import shlex
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..config.code_ids import code_share
from ..config.profiles import Profile
from ..config.settings import GUEST_USER, Settings
from ..errors import BootTimeout, DevboxError, RestoreUnavailable, UnknownDistro
from ..guest.machine import Machine
from ..guest.plan import new_run_id
from ..guest.restore import stack_at, unrestorable
from ..guest.sweep import remove_run_dir, sweep_leftovers
from ..host.parallel import limit, run_bounded
from ..host.probes import resolve_accel
from ..image.cache import ImageCache
from ..log import Log
from ..virt.domain_xml import PrivateLink
from ..virt.qemu_user import is_local
from . import kept


@dataclass
class DistroStats:
    """What the terminal summary shows per distro."""

    distro: str
    boots: int = 0
    boot_seconds: float | None = None
    image_built: bool | None = None
    build_seconds: float | None = None
    retried: int = 0
    restores: int = 0
    restore_seconds: float | None = None
    reused: int = 0  # guests of `devbox up` used by --devbox-reuse


class Pool:
    """One shared Machine per distro, started on first use. Cheap to create: no libvirt
    connection, no image work happens before the first `get` or `fresh`."""

    def __init__(
        self, profiles: Sequence[Profile], settings: Settings, *, log: Log = print
    ) -> None:
        self.profiles = {p.name: p for p in profiles}
        self.settings = settings
        self.log = log
        self.run_id = new_run_id()
        self.stats = {name: DistroStats(name) for name in self.profiles}
        self._machines: dict[str, Machine] = {}
        self._fresh: list[Machine] = []
        self._reused: set[str] = set()  # names of `devbox up` guests this session uses
        # --devbox-keep-failed: guest name -> the first failed test that used it.
        self._failed: dict[str, str] = {}
        self._cache: ImageCache | None = None
        self._rebuilt: set[str] = set()
        self._swept = False
        self._boot_only: dict[str, str] = {}  # distro -> why it is not restored
        # prepare() starts distros in threads: one lock a distro keeps a test's `get`
        # from starting a second guest while a thread is starting the first.
        self._locks = {name: threading.Lock() for name in self.profiles}
        self._sweep_lock = threading.Lock()
        # close() vs a start still under way in another thread (an xdist broker handler,
        # prepare()): a guest that comes up after close() is stopped, never left behind.
        self._closed = False
        self._state_lock = threading.Lock()
        self._log_lock = threading.Lock()
        self._log = log
        self.log = self._log_serialised

    @property
    def distros(self) -> list[str]:
        return list(self.profiles)

    @property
    def accel(self) -> str:
        return resolve_accel(self.settings.accel)

    @property
    def cache(self) -> ImageCache:
        if self._cache is None:
            s = self.settings
            self._cache = ImageCache(
                s.cache_dir,
                repos=s.repos,
                public_index=not s.offline,
                tcg=self.accel == "tcg",
                log=self.log,
                guest_user=(GUEST_USER, os.getuid(), os.getgid()),
                project=s.rootdir,
                offline=s.offline,
            )
        return self._cache

    def _log_serialised(self, message: str) -> None:
        # The plugin's log suspends pytest's capture around each write: one at a time.
        with self._log_lock:
            self._log(message)

    def get(self, distro: str) -> Machine:
        """The session's shared machine for `distro`, booted on first use (thread-safe)."""
        with self._locks.get(distro, contextlib.nullcontext()):
            machine = self._machines.get(distro)
            if machine is None or machine.closed:
                machine = self._reuse(distro) or self._start(distro)
                self._adopt(machine, shared=True)
            return machine

    def _adopt(self, machine: Machine, *, shared: bool) -> None:
        """Take a just-started machine in, or stop it if the pool closed meanwhile."""
        with self._state_lock:
            if not self._closed:
                if shared:
                    self._machines[machine.distro] = machine
                else:
                    self._fresh.append(machine)
                return
        if machine.name in self._reused:
            machine.detach()  # it belongs to `devbox up`
        else:
            machine.close()
        raise DevboxError(
            f"{machine.distro}: the session ended while {machine.name} was starting: "
            "it was stopped again (nothing is left running)"
        )

    def _reuse(self, distro: str) -> Machine | None:
        """With --devbox-reuse, the running guest `devbox up` started for `distro`."""
        if not self.settings.reuse or distro not in self.profiles:
            return None
        from . import reuse

        profile = self.profiles[distro]
        guest = reuse.find(self.settings, profile, self.log)
        if guest is None:
            self.log(f"{distro}: no guest of `devbox up` shares this code dir: starting one")
            return None
        machine = reuse.attach(guest, profile, self.cache, self.settings, self.log)
        self._reused.add(machine.name)
        self.stats[distro].reused += 1
        self.log(f"{distro}: reusing {guest.name} of `devbox up` (not pristine; left running)")
        return machine

    def prepare(self, distros: Sequence[str], *, boot: bool) -> dict[str, str]:
        """Build the missing images of `distros` at the same time, and with `boot` start
        their shared guests too, at most as many at once as cores and memory allow.

        Returns {distro: error} for those that failed; the others are ready (their
        image cached, or their guest up for `get`).
        """
        names = [d for d in distros if d in self.profiles]
        if not names:
            return {}
        job_mib = max(self.profiles[d].memory_mib for d in names)
        at_once = limit(len(names), job_mib)
        what = "starting" if boot else "preparing images of"
        self.log(f"{what} {', '.join(names)} ({at_once} at a time)")
        try:
            self._sweep_once()  # the first libvirt call: an unreachable libvirt fails here
        except DevboxError as e:
            return {d: str(e) for d in names}
        t0 = time.monotonic()
        work = self.get if boot else self._image
        results = run_bounded(names, work, at_once)
        errors = {d: str(r) for d, r in zip(names, results) if isinstance(r, DevboxError)}
        took = time.monotonic() - t0
        self.log(f"{what} {', '.join(names)}: {len(names) - len(errors)} ready in {took:.1f} s")
        return errors

    def _image(self, distro: str) -> None:
        """The cached image of `distro`, built now if missing (once per session with
        --devbox-rebuild), recorded in its stats."""
        with self._locks[distro]:
            rebuild = self.settings.rebuild and distro not in self._rebuilt
            info = self.cache.image_for(self.profiles[distro], rebuild=rebuild)
            self._rebuilt.add(distro)
            stats = self.stats[distro]
            if stats.image_built is None or info.built:
                stats.image_built = info.built
                stats.build_seconds = info.build_seconds

    def running(self, distro: str) -> Machine | None:
        """The shared machine of `distro` if it is up; never starts one."""
        machine = self._machines.get(distro)
        return None if machine is None or machine.closed else machine

    def mark_failed(self, names: Sequence[str], nodeid: str) -> None:
        """With --devbox-keep-failed: the guests `names` were used by the failed test
        `nodeid`, so they stay up after the session (close() says how to reach them)."""
        if self.settings.keep_failed:
            for name in names:
                self._failed.setdefault(name, nodeid)

    def release(self, distro: str) -> None:
        """Stop the shared machine of `distro` now that its tests are done. With keep (or
        a failed test in it, with keep-failed) it stays up (close() says how to reach it)."""
        machine = self._machines.get(distro)
        if machine is None or machine.closed or self.settings.keep:
            return
        if machine.name in self._failed:
            return
        if machine.name in self._reused:
            del self._machines[distro]
            machine.detach()  # it belongs to `devbox up`
            return
        del self._machines[distro]
        self.log(f"{distro}: stopping the shared guest {machine.name}: its tests are done")
        machine.close()

    @contextlib.contextmanager
    def fresh(self, distro: str, *, link: PrivateLink | None = None) -> Iterator[Machine]:
        """A machine of its own for one test, destroyed at exit (kept with keep=True);
        with `link`, a second NIC on a private link (pool/topology.py)."""
        machine = self._start(distro, link)
        self._adopt(machine, shared=False)
        try:
            yield machine
        finally:
            if not self.settings.keep and machine.name not in self._failed:
                machine.close()

    def _start(self, distro: str, link: PrivateLink | None = None) -> Machine:
        profile = self.profiles.get(distro)
        if profile is None:
            raise UnknownDistro(
                f"{distro!r} is not one of this session's distros: {', '.join(self.profiles)}"
            )
        self._sweep_once()
        stats = self.stats[distro]
        # --devbox-rebuild rebuilds each image once per session, not once per machine.
        rebuild = self.settings.rebuild and distro not in self._rebuilt
        machine = self._restore(profile, rebuild, link)
        if machine is None:
            # A restore that got as far as the image rebuilt it already.
            machine = self._boot(profile, rebuild and distro not in self._rebuilt, link)
        self._rebuilt.add(distro)
        if machine.started == "restored":
            stats.restores += 1
            if stats.restore_seconds is None:
                stats.restore_seconds = machine.boot_seconds
        else:
            stats.boots += 1
            if stats.boot_seconds is None:
                stats.boot_seconds = machine.boot_seconds
        if stats.image_built is None or machine.image.built:
            stats.image_built = machine.image.built
            stats.build_seconds = machine.image.build_seconds
        return machine

    def _restore(
        self, profile: Profile, rebuild: bool, link: PrivateLink | None = None
    ) -> Machine | None:
        """A restored machine, or None (saying why, once per distro) to boot instead."""
        s = self.settings
        if s.restore == "off" or profile.name in self._boot_only:
            return None
        share = self.share_for(profile)
        stack = stack_at(s.uri_for(profile.name)) if share == "virtiofs" else None
        why = unrestorable(profile, share, stack)
        if not is_local(s.uri_for(profile.name)):
            # Restore slots are save files in the local cache, which a remote libvirtd
            # cannot read or write.
            why = "remote guests are booted (restore slots are local save files)"
        elif s.keep or s.keep_failed:
            # A restored guest holds its restore slot: it cannot outlive the session.
            flag = "--devbox-keep" if s.keep else "--devbox-keep-failed"
            why = f"{flag} guests are booted (a restored guest ends with its session)"
        elif why is None:
            self._rebuilt.add(profile.name)
            try:
                return Machine.restore(profile, **self._launch_args(profile, rebuild, link))
            except RestoreUnavailable as e:
                why = str(e)
        self._boot_only[profile.name] = why
        self.log(f"{profile.name}: booting instead of restoring: {why}")
        return None

    def share_for(self, profile: Profile) -> str:
        """How /code reaches this session's guests of `profile` (--devbox-share, else the
        profile's own share; a remote host's guests sync whatever this says: guest/sites.py)."""
        return code_share(profile, self.settings.share, self.settings.code_ids).share

    def _launch_args(
        self, profile: Profile, rebuild: bool, link: PrivateLink | None = None
    ) -> dict[str, Any]:
        """What a boot and a restore of this session's guests of `profile` are both told."""
        s = self.settings
        return {
            "share": s.share,  # Plan.make makes it safe (code_ids) and says why
            "sync_exclude": s.sync_exclude,
            "code_ids": s.code_ids,
            "cache": self.cache,
            "code_dir": s.code_dir,
            "uri": s.uri_for(profile.name),
            "accel": s.accel,
            "qemu_user": s.qemu_user,
            "run_id": self.run_id,
            "rebuild": rebuild,
            "boot_timeout": s.boot_timeout,
            "exec_mode": s.exec_mode,
            "link": link,
            "log": self.log,
        }

    def _boot(self, profile: Profile, rebuild: bool, link: PrivateLink | None = None) -> Machine:
        s = self.settings
        stats = self.stats[profile.name]
        attempts = 1 + max(0, s.boot_retries)
        for attempt in range(attempts):
            try:
                return Machine.start(
                    profile,
                    keep=s.keep,
                    keepable=s.keep_failed,
                    remote_pool=s.remote_pool,
                    **self._launch_args(profile, rebuild, link),
                )
            except BootTimeout as e:
                if attempt + 1 >= attempts:
                    raise
                stats.retried += 1
                self.log(f"{profile.name}: boot failed in phase {e.phase!r}; retrying once")
            rebuild = False
        raise AssertionError("unreachable")  # pragma: no cover

    def _keep_failed(self, machine: Machine, *, shared: bool) -> str:
        """Leave the guest of a failed test running, recorded as `devbox up` records its
        guests (so `devbox ls/ssh/destroy` find it); the summary line that says so."""
        nodeid = self._failed[machine.name]
        ssh = machine.ssh_argv()
        machine.keep()
        kept.save(
            self.settings.cache_dir,
            kept.KeptGuest(
                machine.name,
                machine.distro,
                self.settings.uri_for(machine.distro),
                str(machine.overlay),
                tuple(ssh),
                code_dir=str(self.settings.code_dir),
                failed=nodeid,
            ),
        )
        what = "its distro's shared guest: other tests used it too" if shared else "fresh"
        return (
            f"{machine.distro}: {machine.name} kept running ({what}; {nodeid} failed): "
            f"{shlex.join(ssh)}"
        )

    def _sweep_once(self) -> None:
        with self._sweep_lock:
            if self._swept:
                return
            self._swept = True
            s = self.settings
            # Every host this session's distros run on at once: run dirs are swept after
            # the kept guests of all of them are known.
            uris = s.uris(self.profiles)
            for line in sweep_leftovers(uris, s.cache_dir, remote_pool=s.remote_pool):
                self.log(line)

    def close(self) -> list[str]:
        """Stop every machine. With keep, leave them running and say how to reach them."""
        with self._state_lock:
            self._closed = True
            machines = [*self._machines.values(), *self._fresh]
            shared = {id(m) for m in self._machines.values()}
            self._machines.clear()
            self._fresh.clear()
        lines: list[str] = []
        errors: list[DevboxError] = []
        for m in machines:
            if m.closed:
                continue
            if m.name in self._reused:
                m.detach()  # it belongs to `devbox up`: left running, not reported as kept
                continue
            if self.settings.keep:
                m.detach()
                lines.append(f"{m.distro}: {m.name} kept running: {m.ssh_command()}")
                continue
            try:
                if m.name in self._failed:  # filled only with keep-failed
                    lines.append(self._keep_failed(m, shared=id(m) in shared))
                    continue
            except DevboxError as e:
                errors.append(e)
            try:
                m.close()
            except DevboxError as e:
                errors.append(e)
        if not self.settings.keep and not lines:
            # A kept guest's overlay and console log live in the run dir: it stays.
            remove_run_dir(self.settings.cache_dir, self.run_id)
        if lines and self.settings.keep:
            uris = self.settings.uris(m.distro for m in machines)
            lines += [f"stop them with: virsh -c {uri} destroy NAME" for uri in uris]
        elif lines:
            lines.append("look inside with its ssh line; remove with: devbox destroy NAME")
        if errors:
            raise errors[0]
        return lines

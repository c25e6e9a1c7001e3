"""Where a guest is started: the sequence from a profile to a guest that answers SSH.

A boot: plan (image, run dir, share) -> site (this host or a remote one) -> overlay and
console -> who runs QEMU -> domain XML -> the domain, once its memory fits -> readiness
(running, port, banner, auth, /code). A restore: plan -> a saved guest of the profile
restored onto a new overlay (restore.py). Either way the result is the `GuestParts` the
handle (`Machine`) is made of; whatever stops a start half way is torn down here.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import libvirt

from ..config.profiles import Profile
from ..config.settings import (
    DEFAULT_ACCEL,
    DEFAULT_CODE_IDS,
    DEFAULT_QEMU_USER,
    DEFAULT_REMOTE_POOL,
    DEFAULT_URI,
)
from ..image.cache import ImageCache
from ..log import Log
from ..virt import domain as dom
from ..virt import domain_xml
from .parts import GuestParts
from .plan import Plan, qemu_for, tail_file
from .readiness import Boot, Deadline, wait_ready
from .reaper import Reaper
from .restore import RestoreJob, restore_guest
from .sites import GuestFiles, LocalFiles, Site, site_for


@dataclass(frozen=True)
class Launch:
    """How to start a guest, beyond which profile: what the caller chose."""

    uri: str = DEFAULT_URI
    accel: str = DEFAULT_ACCEL
    qemu_user: str = DEFAULT_QEMU_USER
    run_id: str | None = None
    rebuild: bool = False
    keep: bool = False  # no AUTODESTROY: left running past the session
    keepable: bool = False  # no AUTODESTROY, reaped if we die: `keep()` may leave it up
    boot_timeout: float | None = None
    share: str = ""  # every guest's share instead of the profile's; "": the profile's
    remote_pool: str = DEFAULT_REMOTE_POOL
    code_ids: str = DEFAULT_CODE_IDS  # passthrough: the explicit opt-in (config/code_ids.py)
    link: domain_xml.PrivateLink | None = None  # a second NIC to a topology's other guest
    log: Log = print

    def plan(self, profile: Profile, cache: ImageCache, code_dir: Path) -> Plan:
        return Plan.make(
            profile,
            cache,
            code_dir,
            accel=self.accel,
            run_id=self.run_id,
            rebuild=self.rebuild,
            share=self.share,
            code_ids=self.code_ids,
        )


def boot(profile: Profile, cache: ImageCache, code_dir: Path, launch: Launch) -> GuestParts:
    """Boot `profile` on a fresh overlay of its cached image; return once SSH answers
    (and /code is mounted, for a shared /code)."""
    began = time.monotonic()
    plan = launch.plan(profile, cache, code_dir)
    name = plan.new_name()
    log = launch.log
    log(f"{profile.name}: {plan.code.describe()}")
    virconn = dom.connect(launch.uri)
    domain: dom.Domain | None = None
    reaper = Reaper.for_uri(launch.uri) if launch.keepable and not launch.keep else None
    site: Site | None = None
    files: GuestFiles | None = None
    try:
        # This host, or a remote one (its pool, its loopback through a tunnel).
        site = site_for(plan, launch.uri, virconn, launch.remote_pool, log)
        plan = site.adapt(plan, log)
        files = site.files(name)
        reached = plan.reached_paths(files.overlay)
        qemu = qemu_for(virconn, launch.uri, launch.qemu_user, reached, plan.workdir)
        spec = plan.spec(
            name, files.overlay, files.console, qemu, keep=launch.keep, link=launch.link
        )
        autodestroy = not (launch.keep or launch.keepable)
        seconds = plan.deadline_seconds(launch.boot_timeout)
        domain = create_domain(
            virconn, plan, spec, reaper, autodestroy=autodestroy, timeout=seconds, log=log
        )
        deadline = Deadline(seconds)
        watch = Boot(domain, profile.name, files.console, deadline, lambda _, n: files.tail(n))
        ssh = wait_ready(watch, connection=site.connection, share=plan.share, probe=site.probe)
    except BaseException:
        # Half-started is torn down, whatever stopped us (error, Ctrl-C).
        _undo(name, virconn, domain, files, site, reaper)
        raise
    return GuestParts(
        profile=plan.profile,
        image=plan.image,
        accel=plan.accel,
        virconn=virconn,
        domain=domain,
        ssh=ssh,
        files=files,
        share=plan.share,
        code_dir=plan.code_dir,
        site=site,
        reaper=reaper,
        keepable=launch.keep or launch.keepable,
        began=began,
    )


def restore(profile: Profile, cache: ImageCache, code_dir: Path, launch: Launch) -> GuestParts:
    """Like `boot`, but restore a saved booted guest of `profile` (saving one first when
    there is none yet). RestoreUnavailable when it cannot: boot instead."""
    began = time.monotonic()
    plan = launch.plan(profile, cache, code_dir)
    launch.log(f"{profile.name}: {plan.code.describe()}")
    virconn = dom.connect(launch.uri)
    try:
        reached = plan.reached_paths(plan.workdir)
        qemu = qemu_for(virconn, launch.uri, launch.qemu_user, reached, plan.workdir)

        def make_spec(name: str, disk: Path, console: Path) -> domain_xml.DomainSpec:
            # A restored guest ends with its session (it holds a slot): never kept.
            return plan.spec(name, disk, console, qemu, keep=False, link=launch.link)

        job = RestoreJob(
            profile=profile,
            share=plan.share,
            virconn=virconn,
            image=plan.image,
            cache_root=cache.root,
            workdir=plan.workdir,
            make_spec=make_spec,
            timeout=plan.deadline_seconds(launch.boot_timeout),
            connection=plan.connection,
            tail=tail_file,
            log=launch.log,
            # Around the create/restore call only, not the whole restore (a save's
            # build boots a guest: minutes every other start would wait).
            admit=lambda: plan.admitted(
                virconn, plan.deadline_seconds(launch.boot_timeout), launch.log
            ),
        )
        restored = restore_guest(job)
    except BaseException:
        close_quietly(virconn)
        raise
    return GuestParts(
        profile=plan.profile,
        image=plan.image,
        accel=plan.accel,
        virconn=virconn,
        domain=restored.domain,
        ssh=restored.ssh,
        files=LocalFiles(restored.overlay, restored.console),
        share=plan.share,
        code_dir=plan.code_dir,
        restored=restored,
        began=began,
    )


def create_domain(
    virconn: libvirt.virConnect,
    plan: Plan,
    spec: domain_xml.DomainSpec,
    reaper: Reaper | None,
    *,
    autodestroy: bool,
    timeout: float,
    log: Log,
) -> dom.Domain:
    """The domain, created once its memory fits (waiting at most `timeout` s for that);
    watched by `reaper` from before it exists."""
    with plan.admitted(virconn, timeout, log):
        if reaper is not None:
            reaper.watch(spec.name)
        return dom.Domain.create(virconn, spec, autodestroy=autodestroy)


def _undo(
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
    close_quietly(virconn)


def close_quietly(virconn: libvirt.virConnect) -> None:
    # Closing a connection that already broke is not worth an error.
    with contextlib.suppress(libvirt.libvirtError):
        virconn.close()

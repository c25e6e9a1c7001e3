"""The `devbox` subcommands but `run` (cli/run.py): each takes the parsed arguments and
the project's resolved `Context`, prints what was asked for, returns the exit status."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config.option_table import spell_for_command
from ..config.profiles import canonical, select
from ..errors import DevboxError
from ..host.parallel import limit, run_bounded
from ..pool import kept
from ..pool.kept import KeptGuest, login_argv
from .context import Context, UsageProblem, log, shares_code_dir
from .run import login_user, remote_line

if TYPE_CHECKING:
    import libvirt

    from ..config.profiles import Profile


# What one template build holds at its peak: libguestfs' appliance (1280 MiB by default).
TEMPLATE_BUILD_MIB = 1280


def cmd_template_build(args: argparse.Namespace, ctx: Context) -> int:
    from ..image.templates.recipes import template_recipe
    from ..image.templates.repository import DEFAULT_MIRROR, TemplateRepo, default_repo_dir

    repo = TemplateRepo(
        args.repo_dir or default_repo_dir(ctx.settings.cache_dir),
        mirror=args.mirror or DEFAULT_MIRROR,
        log=log,
    )
    # At the same time: one build's mmdebstrap waits on the mirror while another's
    # guestfish appliance uses the CPU (the demo's two builds took 8 min one after the other).
    names = list(dict.fromkeys(args.names))
    for distro in names:
        template_recipe(distro)  # an unknown name is a usage error before any build
    at_once = limit(len(names), TEMPLATE_BUILD_MIB)
    outcomes = run_bounded(names, lambda d: repo.build(d, force=args.force), at_once)
    failed = 0
    for distro, outcome in zip(names, outcomes):
        if isinstance(outcome, DevboxError):
            print(f"{distro}: {outcome}", file=sys.stderr)
            failed += 1
        elif outcome.built:
            print(f"{distro}: built revision {outcome.revision} in {outcome.seconds:.0f} s")
        else:
            print(f"{distro}: up to date (revision {outcome.revision}), nothing to build")
    print(f"repository: {repo.uri}")
    return 1 if failed else 0


def cmd_build(args: argparse.Namespace, ctx: Context) -> int:
    profiles = ctx.selected("build")
    cache = ctx.pool(profiles).cache
    if args.dry_run:
        from .dryrun import print_plans

        return print_plans(cache, profiles)
    ctx.check_offline(profiles)
    for profile in profiles:
        t0 = time.monotonic()
        info = cache.image_for(profile, rebuild=ctx.settings.rebuild)
        state = "built" if info.built else "cached"
        print(f"{profile.name}: {state} {info.path} ({time.monotonic() - t0:.0f} s)")
    return 0


def cmd_key(args: argparse.Namespace, ctx: Context) -> int:
    """The image cache key of each distro: a CI cache keyed by it restores the image
    exactly when the image would be the same (recipe, template revision, guest user)."""
    profiles = ctx.selected("key")
    cache = ctx.pool(profiles).cache
    keys = [(p.name, cache.key_for(p)) for p in profiles]
    if len(keys) == 1:
        print(keys[0][1])  # alone, for `key=$(devbox key debian-12)`
    else:
        for name, key in keys:
            print(f"{name} {key}")
    return 0


def cmd_prune(args: argparse.Namespace, ctx: Context) -> int:
    from . import prune

    s = ctx.settings
    cache = ctx.pool(list(ctx.profiles.values())).cache
    current = prune.current_keys(ctx.profiles, lambda n: cache.key_for(ctx.profiles[n]), log)
    used = prune.in_use(ctx.uris(), s.cache_dir, log)  # first: what runs must stay
    log_dir = args.log_dir or prune.libvirt_log_dir(s.uri)
    found = prune.find(
        s.cache_dir, current, used, log_dir, log, unknown=args.unknown, project=s.rootdir
    )
    done = prune.remove(found, log, dry_run=args.dry_run)
    print("\n".join(prune.report(done, dry_run=args.dry_run)))
    return 0


# --- guests that stay up ---------------------------------------------------------------


def start_kept(ctx: Context, profiles: list[Profile], **changes: Any) -> int:
    """Boot `profiles` at once as guests that stay up; one line per distro."""
    ctx.check_offline(profiles)
    pool = ctx.pool(profiles, keep=True, **changes)
    names = [p.name for p in profiles]
    outcomes = run_bounded(names, pool.get, at_once=len(names))
    failed = 0
    for profile, outcome in zip(profiles, outcomes):
        if isinstance(outcome, DevboxError):
            failed += 1
            log(f"{profile.name}: could not start: {spell_for_command(str(outcome))}")
            continue
        guest = ctx.remember(outcome)
        print(f"{guest.distro}: {guest.name} is up: {shlex.join(guest.ssh)}")
    pool.close()  # keep=True: detaches, the guests stay up
    return 1 if failed else 0


def cmd_up(args: argparse.Namespace, ctx: Context) -> int:
    profiles = ctx.selected("up")
    up = ctx.ours()  # this project's: not another's, nor a failed test's guest
    todo = []
    for p in profiles:
        guest = up.get(p.name)
        if guest is None:
            todo.append(p)
        else:
            print(f"{p.name}: {guest.name} is already up: {shlex.join(guest.ssh)}")
    return start_kept(ctx, todo) if todo else 0


def cmd_rebuild(args: argparse.Namespace, ctx: Context) -> int:
    profiles = ctx.selected("rebuild")
    names = {p.name for p in profiles}
    here = ctx.settings.code_dir.resolve()
    # This project's guests of `devbox up`: not another's, nor a failed test's evidence.
    ours = {g.name for g in ctx.kept() if not g.failed and shares_code_dir(g, here)}
    rows = [r for r in guest_rows(ctx) if r.name in ours and r.distro in names]
    cleaned = all([destroy(ctx, r) for r in rows])  # a list: every one is destroyed
    status = start_kept(ctx, profiles, rebuild=True)
    return status if status or cleaned else 1


def find_kept(ctx: Context, word: str) -> KeptGuest:
    """This project's guest `devbox up` left running for the distro `word`, or the kept
    guest named `word` in full; else an error saying how to start one."""
    named = None if word in ctx.profiles else ctx.named(word)
    if named is not None:
        return named
    select([word], ctx.profiles)  # an unknown name is a usage error first
    guest = ctx.ours().get(word)
    if guest is not None:
        return guest
    start = f"start one with `devbox up {word}`"
    others = [g.name for g in ctx.kept() if g.distro == word]
    if not others:
        raise DevboxError(f"no {word} guest is up: {start}")
    raise DevboxError(
        f"no {word} guest of this project is up: {start}, or name one of another project "
        f"or failed test in full: {', '.join(others)}"
    )


def cmd_ssh(args: argparse.Namespace, ctx: Context) -> int:
    if len(ctx.distros) != 1:
        raise UsageProblem("name one distro: devbox ssh debian-12")
    guest = find_kept(ctx, ctx.distros[0])
    ctx.refresh(guest)
    argv = login_argv(guest, ctx.settings.cache_dir, login_user(args))
    if args.command:  # like ssh: the words are one line of shell code (run in /code)
        argv.append(remote_line(args.command))
    else:  # a login shell that starts where the code is
        if sys.stdin.isatty():
            argv[1:1] = ["-t"]
        argv.append('cd /code 2>/dev/null; exec "${SHELL:-/bin/sh}" -l')
    os.execvp(argv[0], argv)


# --- listing and destroying -----------------------------------------------------------


@dataclass(frozen=True)
class GuestRow:
    name: str
    distro: str
    state: str
    kept: bool
    started: float | None
    image_key: str
    owner_pid: str
    overlay: str
    record: KeptGuest | None
    uri: str = ""  # the libvirt URI of the host it runs on

    @property
    def host(self) -> str:
        """Where it runs, short: "local", or USER@HOST:PORT of a remote libvirt host."""
        from ..transport.tunnel import parse_uri

        remote = parse_uri(self.uri)
        return "local" if remote is None else remote.describe()

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distro": self.distro,
            "state": self.state,
            "kept": self.kept,
            "uptime_seconds": None if self.started is None else int(time.time() - self.started),
            "image_key": self.image_key,
            "owner_pid": self.owner_pid,
            "uri": self.uri,
            "host": self.host,
            "port": self.record.port if self.record else None,
            "ssh": list(self.record.ssh) if self.record else None,
            "code_dir": self.record.code_dir if self.record else None,
            "failed": self.record.failed if self.record else None,
        }


def _started(meta: dict[str, str]) -> float | None:
    try:
        return float(meta["started"])
    except (KeyError, ValueError):
        return None


def guest_rows(ctx: Context) -> list[GuestRow]:
    """Every devbox domain at each URI the project uses (Context.uris), with its kept
    record if it has one. A guest seen at two URIs (two ways to one libvirtd) is listed
    once, at its record's URI if it has one. A URI that cannot be reached is skipped with
    a warning, unless it is the only one."""
    records = {g.name: g for g in ctx.kept()}
    rows: dict[str, GuestRow] = {}
    uris = ctx.uris()
    for uri in uris:
        try:
            found = _rows_at(uri, records)
        except DevboxError as e:
            if len(uris) == 1:
                raise
            log(f"cannot list the guests at {uri}: {str(e).splitlines()[0]}")
            continue
        for row in found:
            seen = rows.get(row.name)
            if seen is None or (row.record is not None and row.record.uri == uri):
                rows[row.name] = row
    return sorted(rows.values(), key=lambda r: r.name)


def _rows_at(uri: str, records: dict[str, KeptGuest]) -> list[GuestRow]:
    from ..virt import domain as dom

    conn = dom.connect(uri)
    try:
        rows = []
        for name, meta in dom.list_devbox_domains(conn):
            try:
                state = dom.Domain(conn.lookupByName(name)).state()
            except Exception:  # vanished meanwhile: libvirtError or DomainError
                state = "gone"
            rows.append(
                GuestRow(
                    name=name,
                    distro=meta.get("distro", "?"),
                    state=state,
                    kept=meta.get("keep") == "1",
                    started=_started(meta),
                    image_key=meta.get("image_key", ""),
                    owner_pid=meta.get("owner_pid", ""),
                    overlay=meta.get("overlay", ""),
                    record=records.get(name),
                    uri=uri,
                )
            )
        return rows
    finally:
        conn.close()


def _age(started: float | None) -> str:
    if started is None:
        return "?"
    minutes = int(time.time() - started) // 60
    return f"{minutes} min" if minutes < 120 else f"{minutes // 60} h"


def cmd_ls(args: argparse.Namespace, ctx: Context) -> int:
    rows = guest_rows(ctx)
    if args.json:
        print(json.dumps([r.as_json() for r in rows], indent=2))
        return 0
    if not rows:
        where = ", ".join(ctx.uris())
        print(f"no devbox guests at {where}: start one with `devbox up DISTRO`")
        return 0
    w = max(len("DISTRO"), *(len(r.distro) for r in rows))
    h = max(len("HOST"), *(len(r.host) for r in rows))
    print(f"{'DISTRO':<{w}}  {'STATE':<9} {'UP':>7}  {'PORT':<6} {'IMAGE':<17} {'HOST':<{h}}  NAME")
    for r in rows:
        port = r.record.port if r.record else "-"
        age = _age(r.started)
        print(
            f"{r.distro:<{w}}  {r.state:<9} {age:>7}  {port:<6} {r.image_key:<17} "
            f"{r.host:<{h}}  {r.name}"
        )
        if r.record:
            print(f"    {shlex.join(r.record.ssh)}")
            if r.record.failed:
                print(f"    kept after {r.record.failed} failed (--devbox-keep-failed)")
        elif r.kept:
            print("    kept by a pytest session (--devbox-keep): its ssh line is in that summary")
        else:
            print(f"    in use by a pytest session (pid {r.owner_pid or '?'})")
    return 0


def destroy(ctx: Context, row: GuestRow) -> bool:
    """Destroy `row`'s domain at its URI, then its disk: a file here, or on a remote
    host the overlay and console volumes in our pool there. False (said why) when its
    overlay here could not be removed."""
    import libvirt

    from ..virt import domain as dom

    conn = dom.connect(row.uri or ctx.settings.uri)
    try:
        with contextlib.suppress(libvirt.libvirtError):
            dom.Domain(conn.lookupByName(row.name)).destroy()
        if row.overlay and row.host != "local":
            _delete_volumes(conn, Path(row.overlay))
    finally:
        conn.close()
    kept.forget(ctx.settings.cache_dir, row.name)
    print(f"destroyed {row.name} ({row.distro})")
    if row.overlay and row.host == "local":
        try:
            Path(row.overlay).unlink(missing_ok=True)
        except OSError as e:  # another user's guest, named in full
            log(
                f"cannot remove {row.name}'s overlay {row.overlay} ({e.strerror}): its owner "
                "or root can remove it"
            )
            return False
    return True


def _delete_volumes(conn: libvirt.virConnect, overlay: Path) -> None:
    """A remote guest's overlay and console volumes (sites.RemoteSite.files names them),
    in the pool over the overlay's directory; what is gone already is no error."""
    from ..virt import volumes

    pool = volumes.ensure_pool(conn, str(overlay.parent))
    for name in (overlay.name, overlay.with_suffix(f".{volumes.CONSOLE}").name):
        volumes.delete(pool, name)


def cmd_destroy(args: argparse.Namespace, ctx: Context) -> int:
    if not args.names and not args.all:
        raise UsageProblem("name guests or distros to destroy, or give --all")
    rows = guest_rows(ctx)
    here = ctx.settings.code_dir.resolve()
    # A distro may be named by an alias (alma-9): guests record the canonical name.
    args.names = [canonical(n, ctx.profiles) for n in args.names]
    # --all means the guests kept in this cache, a distro name this project's of them;
    # any other guest (a pytest session's, another user's) goes only when named in full.
    targets = [
        r
        for r in rows
        if r.name in args.names
        or (r.record and (args.all or (r.distro in args.names and shares_code_dir(r.record, here))))
    ]
    unmatched = [n for n in args.names if not any(n in (r.name, r.distro) for r in targets)]
    for name in unmatched:
        where = ", ".join(ctx.uris())
        log(f"no kept devbox guest named {name} or of distro {name} at {where}")
    cleaned = all([destroy(ctx, row) for row in targets])  # a list: every one goes
    if not targets and args.all:
        print("no kept devbox guest to destroy")
    return 1 if unmatched or not cleaned else 0

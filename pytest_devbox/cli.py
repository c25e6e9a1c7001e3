"""The `devbox` command: the same guests as the pytest plugin, by hand."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import host, kept
from .errors import DevboxError
from .settings import ACCEL_CHOICES, DEFAULT_ACCEL, DEFAULT_URI

if TYPE_CHECKING:
    from .distros import Profile
    from .images import ImageCache


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def cmd_doctor(args: argparse.Namespace) -> int:
    checks = host.run_checks(args.uri, args.cache, args.accel)
    print(host.checks_json(checks) if args.json else host.format_checks(checks))
    return 0 if all(c.ok or not c.required for c in checks) else 1


def cmd_template_build(args: argparse.Namespace) -> int:
    from .templates import DEFAULT_MIRROR, TemplateRepo, default_repo_dir

    repo = TemplateRepo(
        args.repo or default_repo_dir(args.cache), mirror=args.mirror or DEFAULT_MIRROR, log=_log
    )
    for distro in args.distros:
        outcome = repo.build(distro, force=args.force)
        if outcome.built:
            print(f"{distro}: built revision {outcome.revision} in {outcome.seconds:.0f} s")
        else:
            print(f"{distro}: up to date (revision {outcome.revision}), nothing to build")
    print(f"repository: {repo.uri}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    cache = _cache_for(args)
    if args.dry_run:
        from .dryrun import print_plans

        return print_plans(cache, _profiles(args))
    for profile in _profiles(args):
        t0 = time.monotonic()
        info = cache.image_for(profile, rebuild=args.rebuild)
        state = "built" if info.built else "cached"
        print(f"{profile.name}: {state} {info.path} ({time.monotonic() - t0:.0f} s)")
    return 0


def _cache_for(args: argparse.Namespace) -> ImageCache:
    from .images import ImageCache

    return ImageCache(
        args.cache,
        repos=tuple(getattr(args, "repo", ())),
        public_index=not getattr(args, "offline", False),
        tcg=host.resolve_accel(args.accel) == "tcg",
        log=_log,
    )


def _profiles(args: argparse.Namespace) -> list[Profile]:
    from .distros import load_profiles, select

    return select(args.distros, load_profiles(args.project))


def _running(uri: str) -> list[str]:
    from . import domain as dom

    conn = dom.connect(uri)
    try:
        return [name for name, _meta in dom.list_devbox_domains(conn)]
    finally:
        conn.close()


def _kept(cache: Path) -> dict[str, kept.KeptGuest]:
    """Guests started by `devbox up` that still run, by distro (the newest wins)."""
    return kept.load(cache, _running, warn=_log)


def cmd_up(args: argparse.Namespace) -> int:
    from .machine import Machine

    cache = _cache_for(args)
    for profile in _profiles(args):
        m = Machine.start(
            profile,
            cache=cache,
            code_dir=args.code_dir,
            uri=args.uri,
            accel=args.accel,
            keep=True,
            log=_log,
        )
        guest = kept.KeptGuest(m.name, m.distro, args.uri, str(m.overlay), tuple(m.ssh_argv()))
        kept.save(args.cache, guest)
        m.detach()
        print(f"{m.distro}: {m.name} is up: {m.ssh_command()}")
    return 0


def _kept_or_fail(args: argparse.Namespace) -> kept.KeptGuest:
    guest = _kept(args.cache).get(args.distro)
    if guest is None:
        raise DevboxError(f"no {args.distro} guest is up: start one with `devbox up {args.distro}`")
    return guest


def cmd_ssh(args: argparse.Namespace) -> int:
    argv = list(_kept_or_fail(args).ssh)
    os.execvp(argv[0], [*argv, *args.command])


def cmd_run(args: argparse.Namespace) -> int:
    from .machine import Machine

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise DevboxError("nothing to run: devbox run DISTRO -- COMMAND...")
    guest = _kept(args.cache).get(args.distro)
    if guest is not None:
        argv = list(guest.ssh)
        remote = f"cd /code && {shlex.join(command)}"
        return subprocess.run([*argv, remote], check=False).returncode
    # No guest up: boot one for this command only.
    args.distros = [args.distro]
    (profile,) = _profiles(args)
    with Machine.start(
        profile,
        cache=_cache_for(args),
        code_dir=args.code_dir,
        uri=args.uri,
        accel=args.accel,
        log=_log,
    ) as m:
        r = m.run(command, check=False)
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr)
    return r.exit_status if r.exit_status >= 0 else 1


def cmd_ls(args: argparse.Namespace) -> int:
    from . import domain as dom

    conn = dom.connect(args.uri)
    try:
        rows = dom.list_devbox_domains(conn)
    finally:
        conn.close()
    now = time.time()
    print(f"{'NAME':<36} {'DISTRO':<14} {'OWNER':<8} {'KEPT':<5} AGE")
    for name, meta in rows:
        age = now - float(meta.get("started", now))
        print(
            f"{name:<36} {meta.get('distro', '?'):<14} {meta.get('owner_pid', '?'):<8} "
            f"{'yes' if meta.get('keep') == '1' else 'no':<5} {age / 60:.0f} min"
        )
    return 0


def cmd_destroy(args: argparse.Namespace) -> int:
    import libvirt

    from . import domain as dom

    conn = dom.connect(args.uri)
    try:
        targets = [
            (name, meta)
            for name, meta in dom.list_devbox_domains(conn)
            if args.all or name in args.names or meta.get("distro") in args.names
        ]
        if not targets:
            print("no matching devbox guest")
            return 1 if args.names else 0
        for name, meta in targets:
            with contextlib.suppress(libvirt.libvirtError):
                conn.lookupByName(name).destroy()
            if meta.get("overlay"):
                Path(meta["overlay"]).unlink(missing_ok=True)
            kept.forget(args.cache, name)
            print(f"destroyed {name}")
    finally:
        conn.close()
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--uri", default=DEFAULT_URI, help="libvirt URI (default %(default)s)")
    p.add_argument(
        "--cache",
        type=Path,
        default=host.default_cache_dir(),
        help="cache directory (default %(default)s)",
    )
    p.add_argument("--accel", choices=ACCEL_CHOICES, default=DEFAULT_ACCEL)


def _machine_args(p: argparse.ArgumentParser) -> None:
    _image_args(p)
    p.add_argument("--code-dir", type=Path, default=Path.cwd(), help="mounted at /code")


def _image_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--offline", action="store_true", help="do not use the public index")
    p.add_argument("--repo", action="append", default=[], help="extra virt-builder repo URI")
    p.add_argument(
        "--project",
        type=Path,
        default=Path.cwd(),
        help="project dir whose pyproject.toml/devbox.toml defines profiles",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="devbox", description="Disposable libvirt guests per Linux distribution."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("doctor", help="check that this host can run guests")
    _common(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("template", help="local virt-builder templates built from Debian's mirror")
    tsub = p.add_subparsers(dest="template_command", required=True, metavar="ACTION")
    b = tsub.add_parser("build", help="build templates (debian-11, debian-12, debian-13)")
    _common(b)
    b.add_argument("distros", nargs="+", metavar="DISTRO")
    b.add_argument("--repo", type=Path, help="repository dir (default: CACHE/templates)")
    b.add_argument("--mirror", help="Debian mirror URL")
    b.add_argument("--force", action="store_true", help="rebuild even if up to date")
    b.set_defaults(func=cmd_template_build)

    p = sub.add_parser("build", help="build (or check) the cached images of distros")
    _image_args(p)
    p.add_argument("distros", nargs="+", metavar="DISTRO")
    p.add_argument("--rebuild", action="store_true")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the virt-builder command and commands file; build nothing, no network",
    )
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("up", help="boot guests that stay up until `devbox destroy`")
    _machine_args(p)
    p.add_argument("distros", nargs="+", metavar="DISTRO")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("ssh", help="log in to a guest started by `devbox up`")
    _common(p)
    p.add_argument("distro", metavar="DISTRO")
    p.add_argument("command", nargs=argparse.REMAINDER, help="optional command")
    p.set_defaults(func=cmd_ssh)

    p = sub.add_parser("run", help="run a command in the guest that is up, or in a new one")
    _machine_args(p)
    p.add_argument("distro", metavar="DISTRO")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("ls", help="list devbox guests")
    _common(p)
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("destroy", help="destroy guests by name or distro")
    _common(p)
    p.add_argument("names", nargs="*", metavar="NAME|DISTRO")
    p.add_argument("--all", action="store_true", help="every devbox guest")
    p.set_defaults(func=cmd_destroy)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except DevboxError as e:
        print(f"devbox: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("devbox: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `devbox doctor | head`: the reader left; that is not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())

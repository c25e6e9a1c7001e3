"""The `devbox` command: the same guests as the pytest plugin, by hand."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import host
from .errors import DevboxError


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
    from .distros import load_profiles, select
    from .images import ImageCache

    profiles = select(args.distros, load_profiles(args.project))
    cache = ImageCache(
        args.cache,
        repos=tuple(args.repo),
        public_index=not args.offline,
        tcg=host.resolve_accel(args.accel) == "tcg",
        log=_log,
    )
    for profile in profiles:
        t0 = time.monotonic()
        info = cache.image_for(profile, rebuild=args.rebuild)
        state = "built" if info.built else "cached"
        print(f"{profile.name}: {state} {info.path} ({time.monotonic() - t0:.0f} s)")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--uri", default="qemu:///system", help="libvirt URI (default %(default)s)")
    p.add_argument(
        "--cache",
        type=Path,
        default=host.default_cache_dir(),
        help="cache directory (default %(default)s)",
    )
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")


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
    _common(p)
    p.add_argument("distros", nargs="+", metavar="DISTRO")
    p.add_argument("--rebuild", action="store_true")
    p.add_argument("--offline", action="store_true", help="do not use the public index")
    p.add_argument("--repo", action="append", default=[], help="extra virt-builder repo URI")
    p.add_argument(
        "--project",
        type=Path,
        default=Path.cwd(),
        help="project dir whose pyproject.toml/devbox.toml defines profiles",
    )
    p.set_defaults(func=cmd_build)
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


if __name__ == "__main__":
    sys.exit(main())

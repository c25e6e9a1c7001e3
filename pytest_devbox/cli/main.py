"""The `devbox` command: the same guests as the pytest plugin, by hand.

It reads the project's settings exactly as the plugin does (config/option_table.py's
table, resolved from the project's pytest config file and $PYTEST_DEVBOX*, see
context.py), with its own flags on top. This module parses the command line and maps
failures to exit statuses: 2 for what was typed wrong, 1 for what went wrong; never a
traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

from ..config.option_table import OPTIONS, argument_attrs, flag_help, spell_for_command
from ..errors import DevboxError
from . import doctor, images
from . import guests as c
from .catalog import cmd_catalog
from .context import USAGE_ERRORS, Context, load_context
from .run import cmd_run

Command = Callable[[argparse.Namespace, Context], int]

# The table's options each subcommand offers as flags (the others still come from the
# project's config and the environment).
WHERE = ("uri", "cache_dir")
BOOT = ("uri", "cache_dir", "code_dir", "accel", "rebuild", "offline", "repos", "share", "code_ids")
RUN_USAGE = "devbox run [options] [DISTRO[,DISTRO...] ... | NAME | --all-up] -- COMMAND..."
ROOT_HELP = "as root, not as the guest user devbox (whose files in /code are yours)"
DISTRO_WORDS = "DISTRO[,DISTRO...]; none: the project's own selection (devbox ini option)"


def _table_flags(p: argparse.ArgumentParser, keys: Sequence[str]) -> None:
    """Flags from the options table, with its help; None means "not given" so the
    environment and the project's config can decide."""
    for opt in OPTIONS:
        if opt.key not in keys or not opt.cli:
            continue
        help_text = spell_for_command(flag_help(opt)).replace("%", "%%")
        attrs = argument_attrs(opt, opt.key, help_text)
        if opt.kind == "choice":  # argparse checks them; pytest's values go through resolve
            attrs["choices"] = opt.choices
        p.add_argument(opt.cli, **attrs)
    p.add_argument(
        "--project",
        type=Path,
        metavar="DIR",
        help="where to look for the project's pytest config (default: the current "
        "directory, then upwards, as pytest does)",
    )


def _sub(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    summary: str,
    example: str,
    func: Command,
    keys: Sequence[str],
    usage: str | None = None,
) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        usage=usage,
        help=summary,
        description=summary[0].upper() + summary[1:] + ".",
        epilog="example:\n  " + example.replace("\n", "\n  "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _table_flags(p, keys)
    p.set_defaults(func=func, parser=p)
    return p


def _add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = _sub(sub, "doctor", "check that this host can run guests", "devbox doctor",
             doctor.cmd_doctor,
             ("uri", "remote_pool", "cache_dir", "code_dir", "accel", "qemu_user",
              "code_ids"))  # fmt: skip
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = _sub(sub, "template", "build local virt-builder templates from Debian's mirror",
             "devbox template build debian-12", c.cmd_template_build, ("cache_dir",))  # fmt: skip
    p.add_argument("action", choices=["build"])
    p.add_argument("names", nargs="+", metavar="DISTRO", help="debian-11, debian-12, debian-13")
    p.add_argument("--repo-dir", "--repo", dest="repo_dir", type=Path, metavar="DIR",
                   help="repository dir (default: CACHE/templates)")  # fmt: skip
    p.add_argument("--mirror", help="Debian mirror URL")
    p.add_argument("--force", action="store_true", help="rebuild even if up to date")

    p = _sub(sub, "image", "import a local cloud image file as a distro's template",
             "devbox image import ./rocky-9.qcow2 --distro rocky-9", images.cmd_image_import,
             ("cache_dir", "accel"))  # fmt: skip
    p.add_argument("action", choices=["import"])
    p.add_argument("file", metavar="FILE", help="a qcow2 or raw image (or .xz of one)")
    p.add_argument("--distro", required=True, metavar="NAME",
                   help="the profile (with cloud_image) whose template it becomes")  # fmt: skip

    p = _sub(sub, "build", "build (or check) the cached images of distros",
             "devbox build debian-12 centos-7", c.cmd_build,
             ("cache_dir", "accel", "rebuild", "offline", "repos"))  # fmt: skip
    p.add_argument("words", nargs="*", metavar="DISTRO", help=DISTRO_WORDS)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the virt-builder command and commands file; build nothing, no network",
    )

    p = _sub(sub, "catalog", "list the distros, their vendor images and cache state",
             "devbox catalog\ndevbox catalog --check rocky-9 ubuntu-24.04", cmd_catalog,
             ("cache_dir",))  # fmt: skip
    p.add_argument("words", nargs="*", metavar="DISTRO", help="only these (default: all)")
    p.add_argument("--check", action="store_true",
                   help="ask each vendor URL (HEAD) whether its image is still there")  # fmt: skip
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                   help="per URL, for --check (default: 5)")  # fmt: skip

    p = _sub(sub, "key", "print the image cache key of distros (for a CI cache)",
             "devbox key debian-12", c.cmd_key, ("cache_dir", "offline", "repos"))  # fmt: skip
    p.add_argument("words", nargs="*", metavar="DISTRO", help=DISTRO_WORDS)

    p = _sub(sub, "prune", "remove unused images, dead sessions' run dirs and gone guests' "
             "libvirt logs", "devbox prune --dry-run", c.cmd_prune,
             ("uri", "cache_dir", "offline", "repos"))  # fmt: skip
    p.add_argument("--dry-run", action="store_true",
                   help="list what would be removed, with sizes; remove nothing")  # fmt: skip
    p.add_argument("--unknown", action="store_true",
                   help="also remove images of distros no profile of this project names "
                   "(the cache is shared by your projects)")  # fmt: skip
    p.add_argument("--log-dir", type=Path, metavar="DIR",
                   help="libvirt's per-domain log dir (default: /var/log/libvirt/qemu for the "
                   "system daemon, ~/.cache/libvirt/qemu/log for qemu:///session)")  # fmt: skip

    _add_guest_commands(sub)


def _add_guest_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = _sub(sub, "up", "boot guests that stay up until `devbox destroy`",
             "devbox up debian-11,debian-12", c.cmd_up, BOOT)  # fmt: skip
    p.add_argument("words", nargs="*", metavar="DISTRO", help=DISTRO_WORDS)

    p = _sub(sub, "rebuild", "destroy a distro's kept guests, rebuild its image, start it again",
             "devbox rebuild debian-12", c.cmd_rebuild, BOOT)  # fmt: skip
    p.add_argument("words", nargs="*", metavar="DISTRO", help=DISTRO_WORDS)

    p = _sub(sub, "run", "run shell code in /code on guests (those not up boot for it)",
             "devbox run debian-12 -- 'ls | head -3; uname -r'\n"
             "devbox run debian-11,debian-12 -- make test\n"
             "devbox run --all-up -- git status --short", cmd_run, (*BOOT, "keep", "exec_mode"),
             usage=RUN_USAGE)  # fmt: skip
    p.add_argument("words", nargs="*", metavar="DISTRO", help=DISTRO_WORDS + "; or the "
                   "full NAME of any kept guest")  # fmt: skip
    p.add_argument("--all-up", action="store_true",
                   help="on every guest of this project that is up")  # fmt: skip
    p.add_argument("--root", action="store_true", help=ROOT_HELP)

    p = _sub(sub, "ssh", "log in to a guest started by `devbox up` (in /code)",
             "devbox ssh debian-12\ndevbox ssh debian-12 -- 'cat /etc/os-release'",
             c.cmd_ssh, WHERE,
             usage="devbox ssh [options] DISTRO|NAME [-- COMMAND...]")  # fmt: skip
    p.add_argument("words", nargs="*", metavar="DISTRO",
                   help="one distro this project has up, or the full NAME of a kept "
                   "guest")  # fmt: skip
    p.add_argument("--root", action="store_true", help=ROOT_HELP)

    p = _sub(sub, "ls", "list devbox guests: state, uptime, image, how to reach them",
             "devbox ls --json", c.cmd_ls, WHERE)  # fmt: skip
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = _sub(sub, "destroy", "destroy this project's kept guests by distro, or any devbox "
             "guest by name", "devbox destroy debian-12\ndevbox destroy --all",
             c.cmd_destroy, WHERE)  # fmt: skip
    p.add_argument("names", nargs="*", metavar="NAME|DISTRO")
    p.add_argument("--all", action="store_true", help="every guest kept in this cache")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="devbox",
        description="Disposable libvirt guests per Linux distribution, configured like the "
        "pytest-devbox plugin of this project.",
        allow_abbrev=False,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_commands(sub)
    return parser


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """Arguments as the subcommands want them. After `--` comes the command of `run` and
    `ssh`; without `--`, their first word names the distros and the rest is the command."""
    argv = list(argv)
    tail: list[str] | None = None
    if "--" in argv:
        i = argv.index("--")
        argv, tail = argv[:i], argv[i + 1 :]
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    takes_command = args.command in ("run", "ssh")
    if unknown:
        hint = " (the command to run goes after --)" if takes_command else ""
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    if tail is not None and not takes_command:
        args.parser.error("takes no command after --")
    if takes_command:
        words = list(args.words)
        if tail is None:  # ssh-like: DISTRO COMMAND...; with --all-up every word is command
            keep = 0 if getattr(args, "all_up", False) else 1
            words, tail = words[:keep], words[keep:]
        args.words, args.command = words, tail
    # The distros named on the command line, for the options table ("distros").
    named = getattr(args, "words", None)
    args.distros = list(named) if named else None
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        return int(args.func(args, load_context(args)))
    except USAGE_ERRORS as e:
        _error(e)
        return 2
    except DevboxError as e:
        _error(e)
        return 1
    except KeyboardInterrupt:
        print("devbox: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `devbox ls | head`: the reader left; that is not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _error(e: Exception) -> None:
    text = spell_for_command(str(e)).removeprefix("devbox: ")
    print(f"devbox: error: {text}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

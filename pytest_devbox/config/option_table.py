"""The devbox options in one table (config/resolve.py turns them into `Settings`).

Each `Option` knows its pytest flag, ini name, environment variable (if any), type and
help. The table generates pytest's `addoption` and `addini` calls, and `resolve` turns
the values of one face into `Settings`: command line first, then environment, then ini
file, then the defaults of `Settings`. Every value is checked here, before any guest
starts; a bad one is a `pytest.UsageError` that names where it came from.

`resolve` knows nothing of pytest's `Config`: the `devbox` command can pass its own
command-line values (by option key), an ini reader of the same project files, and its
own flag names for the messages.

Messages of every layer name an option by its pytest flag (`--devbox-offline`): that is
the option's name in the table. A face that spells its flags otherwise rewrites them
with `spell_for_command`, so every hint names a flag of the face that printed it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any, Callable, Literal

import pytest

from .settings import (
    ACCEL_CHOICES,
    CODE_IDS_CHOICES,
    EXEC_CHOICES,
    QEMU_USER_CHOICES,
    RESTORE_CHOICES,
    SHARE_CHOICES,
    Settings,
)

Kind = Literal["distros", "text", "choice", "dir", "bool", "list"]
# Reads one ini option by its ini name; None, "" or [] when the project does not set it.
IniReader = Callable[[str], Any]


@dataclass(frozen=True)
class Option:
    """One setting as every face spells it."""

    key: str  # the Settings field; "distros" is the selection, not a Settings field
    flag: str
    ini: str
    kind: Kind
    help: str
    env: str | None = None
    metavar: str | None = None
    default_help: str = ""  # how --help names the default when Settings' value won't do
    choices: tuple[str, ...] = ()
    must_exist: bool = False  # a "dir" that must already be a directory
    writable: bool = False  # a "dir" we write into: made if missing, checked by a write
    cli: str = ""  # the devbox command's flag; "" where the command has none


DISTROS = Option(
    "distros",
    "--devbox",
    "devbox",
    "distros",
    "comma-separated distros to run the devbox tests on ('all' for every known profile)",
    env="PYTEST_DEVBOX",
    metavar="LIST",
)
OPTIONS: tuple[Option, ...] = (
    DISTROS,
    Option(
        "uri",
        "--devbox-uri",
        "devbox_uri",
        "text",
        "libvirt connection URI",
        metavar="URI",
        cli="--uri",
    ),
    Option(
        "remote_pool",
        "--devbox-remote-pool",
        "devbox_remote_pool",
        "text",
        "directory of our libvirt storage pool on a remote --devbox-uri host (uploaded "
        "images, guests' overlays and consoles)",
        metavar="PATH",
        cli="--remote-pool",
    ),
    Option(
        "cache_dir",
        "--devbox-cache",
        "devbox_cache",
        "dir",
        "image and key cache directory",
        metavar="DIR",
        default_help="/var/cache/pytest-devbox as root, else $XDG_CACHE_HOME/pytest-devbox; "
        "$PYTEST_DEVBOX_CACHE overrides",
        cli="--cache",
        writable=True,
    ),
    Option(
        "code_dir",
        "--devbox-code-dir",
        "devbox_code_dir",
        "dir",
        "host directory shared as /code in every guest",
        metavar="DIR",
        default_help="pytest's rootdir",
        must_exist=True,
        cli="--code-dir",
    ),
    Option(
        "accel",
        "--devbox-accel",
        "devbox_accel",
        "choice",
        "virtualisation: kvm, tcg (software emulation) or auto (kvm where it really works)",
        metavar="|".join(ACCEL_CHOICES),
        choices=ACCEL_CHOICES,
        cli="--accel",
    ),
    Option(
        "qemu_user",
        "--devbox-qemu-user",
        "devbox_qemu_user",
        "choice",
        "who runs QEMU: caller (you, so QEMU reaches a private home and 9p writes are "
        "yours) or libvirt (its configured user, which must reach the cache and code dir)",
        metavar="|".join(QEMU_USER_CHOICES),
        choices=QEMU_USER_CHOICES,
        cli="--qemu-user",
    ),
    Option(
        "restore",
        "--devbox-restore",
        "devbox_restore",
        "choice",
        "start guests by restoring a saved booted guest (seconds) instead of booting: "
        "auto (profiles sharing /code over 9p; others boot) or off",
        metavar="|".join(RESTORE_CHOICES),
        choices=RESTORE_CHOICES,
        cli="--restore",
    ),
    Option(
        "exec_mode",
        "--devbox-exec",
        "devbox_exec",
        "choice",
        "how commands run in a guest: auto (a resident executor, tens of milliseconds a "
        "command, where the guest has a Python 3; plain SSH elsewhere) or ssh (an SSH exec "
        "channel per command)",
        metavar="|".join(EXEC_CHOICES),
        choices=EXEC_CHOICES,
        cli="--exec",
    ),
    Option(
        "share",
        "--devbox-share",
        "devbox_share",
        "choice",
        "how /code reaches every guest, instead of each profile's own share: virtiofs or 9p "
        "(the host directory, shared) or sync (a copy over SSH, refreshed by devbox.sync(); "
        "no shared file system needed)",
        metavar="|".join(SHARE_CHOICES),
        default_help="each profile's own",
        choices=SHARE_CHOICES,
        cli="--share",
    ),
    Option(
        "code_ids",
        "--devbox-code-ids",
        "devbox_code_ids",
        "choice",
        "whose ids what guests write in a shared /code gets on the host: auto (guest root "
        "cannot make root-owned, setuid or device files there: 9p in mapped mode, virtiofs "
        "profiles moved to 9p or sync) or passthrough (guest ids are host ids: guest root is "
        "host root on the code dir)",
        metavar="|".join(CODE_IDS_CHOICES),
        choices=CODE_IDS_CHOICES,
        cli="--code-ids",
    ),
    Option(
        "sync_exclude",
        "--devbox-sync-exclude",
        "devbox_sync_exclude",
        "list",
        "a gitignore-style pattern of files a sync does not copy into /code (repeatable; "
        "one a line in the ini file; on top of what .gitignore leaves out in a git work tree)",
        metavar="PATTERN",
    ),
    Option(
        "rebuild",
        "--devbox-rebuild",
        "devbox_rebuild",
        "bool",
        "rebuild the cached disk images of the selected distros",
        cli="--rebuild",
    ),
    Option(
        "keep",
        "--devbox-keep",
        "devbox_keep",
        "bool",
        "leave the guests running after the session and print how to reach them",
        cli="--keep",
    ),
    Option(
        "keep_failed",
        "--devbox-keep-failed",
        "devbox_keep_failed",
        "bool",
        "leave the guests a failed test used running after the session (a shared guest "
        "too) and print how to reach them; guests then boot instead of being restored",
    ),
    Option(
        "reuse",
        "--devbox-reuse",
        "devbox_reuse",
        "bool",
        "use the running guests `devbox up` started for the same profile and code dir "
        "instead of booting, and leave them running (they are not pristine)",
    ),
    Option(
        "offline",
        "--devbox-offline",
        "devbox_offline",
        "bool",
        "do not use the public virt-builder index: only local template repositories",
        cli="--offline",
    ),
    Option(
        "eager",
        "--devbox-eager",
        "devbox_eager",
        "bool",
        "start the shared guests of every selected distro at session start, at the same "
        "time (as many at once as cores and memory allow), not when each one's first test "
        "asks",
    ),
    Option(
        "artifacts_dir",
        "--devbox-artifacts",
        "devbox_artifacts",
        "dir",
        "where a failed test's guests leave their console log, journal and kernel log "
        "tails and SELinux denials, one directory per test (default: nowhere)",
        metavar="DIR",
    ),
    Option(
        "repos",
        "--devbox-repo",
        "devbox_repo",
        "list",
        "an extra virt-builder repository index URI (repeatable; one a line in the ini file)",
        metavar="URI",
        cli="--repo",
    ),
)
HOW_TO_SELECT = (
    f"run with {DISTROS.flag}=debian-12 (or set {DISTROS.env} / the {DISTROS.ini} ini option)"
)
# The devbox command's flags by option key; its distros are words, not a flag.
COMMAND_FLAGS: dict[str, str] = {o.key: o.cli for o in OPTIONS if o.cli} | {"distros": "DISTRO"}
_PYTEST_FLAG = re.compile(r"--devbox(?:-[a-z]+)*(?![\w-])")


def spell_for_command(text: str) -> str:
    """`text` with every pytest flag of the table written as the devbox command's flag
    (`--devbox-offline` -> `--offline`); flags the command lacks stay as they are."""
    names = {o.flag: o.cli for o in OPTIONS if o.cli}
    return _PYTEST_FLAG.sub(lambda m: names.get(m.group(0), m.group(0)), text)


# --- pytest: the table as addoption and addini ----------------------------------------


def _default_help(opt: Option) -> str:
    if opt.default_help:
        return opt.default_help
    for f in fields(Settings):
        if f.name == opt.key and isinstance(f.default, str):
            return f.default
    return ""


def flag_help(opt: Option) -> str:
    """The --help text of a flag: what it does, its default, what it overrides."""
    default = _default_help(opt)
    text = opt.help + (f" (default: {default})" if default else "") + "."
    if opt.env:
        return f"{text} Overrides ${opt.env}, which overrides the '{opt.ini}' ini option."
    return f"{text} Overrides the '{opt.ini}' ini option."


# An action, not a setting: no ini twin, no Settings field.
MATRIX_FLAG = "--devbox-matrix"


def argument_attrs(opt: Option, dest: str, help: str) -> dict[str, Any]:
    """argparse's keywords for ``opt``'s flag, in either face. default=None everywhere:
    "not given" must be told apart, so the environment and the ini file can decide."""
    attrs: dict[str, Any] = {"dest": dest, "default": None, "help": help}
    if opt.kind == "bool":
        attrs["action"] = "store_true"
        return attrs
    attrs["metavar"] = opt.metavar
    if opt.kind == "list":
        attrs["action"] = "append"
    return attrs


def add_options(parser: pytest.Parser) -> None:
    """Register every option of the table as a flag and an ini option."""
    group = parser.getgroup("devbox", "run tests in disposable libvirt VMs (pytest-devbox)")
    group.addoption(
        MATRIX_FLAG,
        dest="devbox_matrix",
        action="store_true",
        default=False,
        help="print the selected distros (every known profile when none is selected) as a "
        "JSON list, for a CI matrix, and exit.",
    )
    for opt in OPTIONS:
        group.addoption(opt.flag, **argument_attrs(opt, opt.ini, flag_help(opt)))
        if opt.kind == "bool":
            parser.addini(opt.ini, opt.help, type="bool", default=False)
        elif opt.kind == "list":
            parser.addini(opt.ini, opt.help, type="linelist")
        else:
            parser.addini(opt.ini, opt.help, default="")

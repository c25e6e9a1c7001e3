"""The devbox options in one table, and their resolution into `Settings`.

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

import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Literal

import pytest

from .settings import ACCEL_CHOICES, EXEC_CHOICES, QEMU_USER_CHOICES, RESTORE_CHOICES, Settings

Kind = Literal["distros", "text", "choice", "dir", "bool", "list"]
# Reads one ini option by its ini name; None, "" or [] when the project does not set it.
IniReader = Callable[[str], Any]

_TRUE = ("1", "true", "yes", "on", "y", "t")
_FALSE = ("0", "false", "no", "off", "n", "f")


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
        "offline",
        "--devbox-offline",
        "devbox_offline",
        "bool",
        "do not use the public virt-builder index: only local template repositories",
        cli="--offline",
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
    for opt in OPTIONS:
        group.addoption(opt.flag, **argument_attrs(opt, opt.ini, flag_help(opt)))
        if opt.kind == "bool":
            parser.addini(opt.ini, opt.help, type="bool", default=False)
        elif opt.kind == "list":
            parser.addini(opt.ini, opt.help, type="linelist")
        else:
            parser.addini(opt.ini, opt.help, default="")


# --- resolution: command line > environment > ini > Settings' defaults ----------------


@dataclass(frozen=True)
class Places:
    """What relative paths are relative to, and the default code dir."""

    cwd: Path  # command-line and environment paths
    ini_dir: Path  # ini paths: the ini file's folder
    rootdir: Path  # the project: the default code dir


@dataclass(frozen=True)
class Source:
    """Where a value came from, named as the user wrote it."""

    where: Literal["cli", "env", "ini"]
    name: str

    def __str__(self) -> str:
        if self.where == "env":
            return f"${self.name}"
        if self.where == "ini":
            return f"the {self.name} ini option"
        return self.name


@dataclass(frozen=True)
class Resolved:
    """One face's settings and the distros it selected (names, not yet checked)."""

    settings: Settings
    distros: list[str]


def _usage(source: Source, value: Any, problem: str) -> pytest.UsageError:
    return pytest.UsageError(f"devbox: {source}={value!r}: {problem}")


def _is_set(value: Any) -> bool:
    # False counts as unset: a flag that is off must not hide an ini value that is on.
    if isinstance(value, str):
        return bool(value.strip())
    return value not in (None, False, [], ())


def _pick(
    opt: Option, cli: Any, ini: IniReader, env: Mapping[str, str], flag: str
) -> tuple[Any, Source] | None:
    """The value that wins for `opt` and where it came from; None when nothing is set."""
    # An explicit empty --devbox= selects nothing, overriding env and ini.
    if _is_set(cli) or (opt.kind == "distros" and cli is not None):
        return cli, Source("cli", flag)
    if opt.env and _is_set(env.get(opt.env)):
        return env[opt.env], Source("env", opt.env)
    try:
        value = ini(opt.ini)
    except (ValueError, pytest.UsageError) as e:  # pytest's own check of an ini bool
        raise pytest.UsageError(f"devbox: the {opt.ini} ini option: {e}") from e
    return (value, Source("ini", opt.ini)) if _is_set(value) else None


def parse_distro_list(value: str, source: Source | str) -> list[str]:
    """Split 'debian-11, debian-12' into names; an empty name is a usage error."""
    if not value.strip():
        return []
    names = [n.strip() for n in value.split(",")]
    if any(not n for n in names):
        raise pytest.UsageError(
            f"devbox: {source}={value!r} contains an empty distro name: "
            "give a comma-separated list like debian-11,debian-12"
        )
    return names


def _to_bool(value: Any, source: Source) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise _usage(source, value, "not a boolean: use true or false")


def _to_dir(opt: Option, value: Any, source: Source, places: Places, flag: str) -> Path:
    base = places.ini_dir if source.where == "ini" else places.cwd
    path = (base / os.path.expanduser(str(value).strip())).resolve()
    if opt.must_exist and not path.is_dir():
        raise pytest.UsageError(
            f"devbox: the {opt.key.replace('_', ' ')} {path} does not exist or is not a "
            f"directory; point {flag} (or the {opt.ini} ini option) at your project"
        )
    if path.exists() and not path.is_dir():
        raise _usage(source, value, f"{path} is not a directory")
    if opt.writable:
        try:  # a real write: access() says yes to root even where writes fail
            path.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=path).close()
        except OSError as e:
            raise pytest.UsageError(
                f"devbox: cannot use {path} as the {opt.key.replace('_', ' ')} ({e.strerror}); "
                f"point {flag} (or the {opt.ini} ini option) at a writable directory"
            ) from None
    return path


def _convert(opt: Option, value: Any, source: Source, places: Places, flag: str) -> Any:
    """`value` as the type Settings wants, or a usage error naming its source."""
    if opt.kind == "bool":
        return _to_bool(value, source)
    if opt.kind == "dir":
        return _to_dir(opt, value, source, places, flag)
    if opt.kind == "list":
        items = value.splitlines() if isinstance(value, str) else list(value)
        return tuple(str(i).strip() for i in items if str(i).strip())
    if opt.kind == "distros":
        text = ",".join(value) if isinstance(value, (list, tuple)) else str(value)
        return parse_distro_list(text, source)
    text = str(value).strip()
    if opt.kind == "choice" and text not in opt.choices:
        *first, last = opt.choices
        raise _usage(source, value, f"unknown {opt.key} {text!r}: use {', '.join(first)} or {last}")
    if opt.key == "uri" and "://" not in text:
        raise _usage(source, value, "not a libvirt URI (driver:///path or driver://host/path)")
    return text


def resolve(
    cli: Mapping[str, Any],
    ini: IniReader,
    places: Places,
    *,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, str] | None = None,
) -> Resolved:
    """Every option's value: `cli` (by option key; None = not given), then `env`, then
    `ini`, then the `Settings` default. `flags` renames flags in messages (by key), for
    a face whose flags differ from pytest's."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        flag = (flags or {}).get(opt.key, opt.flag)
        picked = _pick(opt, cli.get(opt.key), ini, env, flag)
        if picked is not None:
            values[opt.key] = _convert(opt, *picked, places, flag)
    distros: list[str] = values.pop("distros", [])
    values.setdefault("code_dir", places.rootdir)
    return Resolved(Settings(**values), distros)


def resolve_config(config: pytest.Config) -> Resolved:
    """`resolve` for a pytest run: its command line, environment and ini file."""
    cli = {opt.key: config.getoption(opt.ini) for opt in OPTIONS}
    ini_dir = config.inipath.parent if config.inipath else config.rootpath
    places = Places(config.invocation_params.dir, ini_dir, config.rootpath)
    return resolve(cli, config.getini, places)

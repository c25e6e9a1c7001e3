"""Resolution of the options table into `Settings`: command line > environment > ini
file > the defaults of `Settings`, every value checked before any guest starts.

`resolve` knows nothing of pytest's `Config`: the `devbox` command passes its own
command-line values (by option key), an ini reader of the same project files and its
own flag names for the messages; `resolve_config` is the pytest face's call.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest

from ..errors import ProfileError
from ..host.probes import cache_problem
from .code_ids import override_problem
from .option_table import OPTIONS, IniReader, Option
from .profiles import load_hosts
from .settings import Settings

TRUE_WORDS = ("1", "true", "yes", "on", "y", "t")
FALSE_WORDS = ("0", "false", "no", "off", "n", "f")


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
    if text in TRUE_WORDS or text in FALSE_WORDS:
        return text in TRUE_WORDS
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
            path.mkdir(mode=0o700, parents=True, exist_ok=True)  # the cache: private
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
    cache_used: bool = False,
) -> Resolved:
    """Every option's value: `cli` (by option key; None = not given), then `env`, then
    `ini`, then the `Settings` default. `flags` renames flags in messages (by key), for
    a face whose flags differ from pytest's. The cache dir is made and checked when
    distros are selected or `cache_used` (a session that selects none never touches it)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        flag = (flags or {}).get(opt.key, opt.flag)
        picked = _pick(opt, cli.get(opt.key), ini, env, flag)
        if picked is not None:
            values[opt.key] = _convert(opt, *picked, places, flag)
    distros: list[str] = values.pop("distros", [])
    values.setdefault("code_dir", places.rootdir)
    values["rootdir"] = places.rootdir
    try:
        values["hosts"] = load_hosts(places.rootdir)
    except ProfileError as e:
        raise pytest.UsageError(str(e)) from None
    share_problem = override_problem(values.get("share", ""), values.get("code_ids", "auto"))
    if share_problem is not None:
        raise pytest.UsageError(f"devbox: {share_problem}")
    settings = Settings(**values)
    problem = cache_problem(settings.cache_dir) if distros or cache_used else None
    if problem is not None:
        raise pytest.UsageError(f"devbox: {problem}")
    return Resolved(settings, distros)


def resolve_config(config: pytest.Config) -> Resolved:
    """`resolve` for a pytest run: its command line, environment and ini file."""
    cli = {opt.key: config.getoption(opt.ini) for opt in OPTIONS}
    ini_dir = config.inipath.parent if config.inipath else config.rootpath
    places = Places(config.invocation_params.dir, ini_dir, config.rootpath)
    return resolve(cli, config.getini, places)

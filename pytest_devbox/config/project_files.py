"""The project's pytest configuration, found and read the way pytest finds and reads it,
so that the `devbox` command sees the same `devbox*` ini options as the plugin.

pytest looks from the directory it is given (the current one by default) upwards for
the first of pytest.toml, .pytest.toml, pytest.ini, .pytest.ini, pyproject.toml,
tox.ini and setup.cfg that holds pytest configuration, and that file's folder is the
rootdir. Without one, the rootdir is the nearest folder with a pyproject.toml, then
with a setup.py, else the starting folder. `addopts` (and $PYTEST_ADDOPTS) can carry
`--devbox*` flags too: pytest treats them as command-line flags, and so does
`pytest_args` here. These are pytest's documented rules (8.1 and later); the equivalence
test runs both faces on the same files to keep them so.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import iniconfig
import pytest

from .option_table import OPTIONS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python < 3.11 only
    import tomli as tomllib  # type: ignore[import-not-found,no-redef,unused-ignore]

Values = dict[str, Any]


@dataclass(frozen=True)
class ProjectConfig:
    """pytest's view of a project: its rootdir, its config file and that file's values
    (str or list of str from INI-style files, native TOML types from TOML tables)."""

    rootdir: Path
    inipath: Path | None
    values: Values = field(default_factory=dict)

    @property
    def ini_dir(self) -> Path:
        """What relative paths in the config file are relative to."""
        return self.inipath.parent if self.inipath else self.rootdir

    def read(self, name: str) -> Any:
        """An ini option's raw value, None when the file does not set it (an IniReader)."""
        return self.values.get(name)


def _ini_section(path: Path, section: str) -> Values | None:
    try:
        ini = iniconfig.IniConfig(str(path))
    except iniconfig.ParseError as e:
        raise pytest.UsageError(f"devbox: {e}") from e
    if section in ini:
        return dict(ini[section].items())
    if path.name == "setup.cfg" and "pytest" in ini:
        raise pytest.UsageError(
            f"devbox: {path}: a [pytest] section in setup.cfg is not read by pytest: "
            "rename it to [tool:pytest]"
        )
    return None


def _toml(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise pytest.UsageError(f"devbox: {path}: {e}") from e
    return data


def _pytest_toml(path: Path) -> Values | None:
    table = _toml(path).get("pytest", {})
    return dict(table) if isinstance(table, dict) else {}


def _pytest_ini(path: Path) -> Values | None:
    # pytest.ini is pytest's file even without a [pytest] section.
    return _ini_section(path, "pytest") or {}


def _pyproject(path: Path) -> Values | None:
    tool = _toml(path).get("tool", {}).get("pytest", {})
    native = {k: v for k, v in tool.items() if k != "ini_options"}
    ini_options = tool.get("ini_options")
    if native and ini_options is not None:
        raise pytest.UsageError(
            f"devbox: {path}: use [tool.pytest] or [tool.pytest.ini_options], not both"
        )
    if native:
        return native
    if ini_options is None:
        return None
    # INI mode: pytest turns every scalar into its string, as an INI file would give it.
    return {k: v if isinstance(v, list) else str(v) for k, v in ini_options.items()}


# In pytest's order of precedence within one folder.
_LOADERS: dict[str, Callable[[Path], Values | None]] = {
    "pytest.toml": _pytest_toml,
    ".pytest.toml": _pytest_toml,
    "pytest.ini": _pytest_ini,
    ".pytest.ini": _pytest_ini,
    "pyproject.toml": _pyproject,
    "tox.ini": lambda p: _ini_section(p, "pytest"),
    "setup.cfg": lambda p: _ini_section(p, "tool:pytest"),
}


def locate(start: Path) -> ProjectConfig:
    """The configuration pytest would use when run in `start` without arguments."""
    start = start.resolve()
    bare_pyproject: Path | None = None
    for base in (start, *start.parents):
        for name, load in _LOADERS.items():
            path = base / name
            if not path.is_file():
                continue
            if name == "pyproject.toml" and bare_pyproject is None:
                bare_pyproject = path
            values = load(path)
            if values is not None:
                return ProjectConfig(base, path, values)
    if bare_pyproject is not None:
        return ProjectConfig(bare_pyproject.parent, bare_pyproject)
    for base in (start, *start.parents):
        if (base / "setup.py").is_file():
            return ProjectConfig(base, None)
    return ProjectConfig(start, None)


def _split(value: Any) -> list[str]:
    if isinstance(value, list):
        return [str(v) for v in value]
    return shlex.split(str(value or ""))


def pytest_args(config: ProjectConfig, env: Mapping[str, str]) -> dict[str, Any]:
    """The `--devbox*` flags that pytest would take from `addopts` and $PYTEST_ADDOPTS,
    by option key, in the form `options.resolve` takes command-line values."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for opt in OPTIONS:
        action = {"bool": "store_true", "list": "append"}.get(opt.kind, "store")
        parser.add_argument(opt.flag, dest=opt.key, action=action, default=None)
    # pytest puts the ini's addopts first, then $PYTEST_ADDOPTS, then the command line.
    words = _split(config.read("addopts")) + _split(env.get("PYTEST_ADDOPTS", ""))
    known, _others = parser.parse_known_args(words)
    return {k: v for k, v in vars(known).items() if v is not None}

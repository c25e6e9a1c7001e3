"""The options table and its resolution, as the pytest plugin and the devbox command use it."""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

import pytest

import pytest_devbox
from pytest_devbox.config.option_table import OPTIONS
from pytest_devbox.config.resolve import Places, resolve
from pytest_devbox.config.settings import DEFAULT_URI, Settings


@pytest.fixture
def places(tmp_path: Path) -> Places:
    for name in ("cwd", "project", "project/code", "project/cache", "cwd/code"):
        (tmp_path / name).mkdir()
    return Places(cwd=tmp_path / "cwd", ini_dir=tmp_path / "project", rootdir=tmp_path / "project")


def reader(values: dict[str, Any]) -> Any:
    """An ini reader over a dict, as a face that reads the project files itself would be."""
    return lambda name: values.get(name)


INI = {
    "devbox": "debian-11, debian-12",
    "devbox_uri": "test:///default",
    "devbox_cache": "cache",
    "devbox_code_dir": "code",
    "devbox_accel": "tcg",
    "devbox_rebuild": "yes",
    "devbox_keep": True,
    "devbox_offline": "false",
    "devbox_repo": "file:///a/index\n\nfile:///b/index\n",
}


def test_nothing_set_gives_the_settings_defaults(places: Places) -> None:
    resolved = resolve({}, reader({}), places, env={})
    assert resolved.distros == []
    assert resolved.settings == Settings(code_dir=places.rootdir, rootdir=places.rootdir)
    assert resolved.settings.uri == DEFAULT_URI


def test_ini_values_are_typed_and_relative_to_the_ini_file(places: Places) -> None:
    resolved = resolve({}, reader(INI), places, env={})
    assert resolved.distros == ["debian-11", "debian-12"]
    s = resolved.settings
    assert (s.uri, s.accel, s.rebuild, s.keep, s.offline) == (
        "test:///default",
        "tcg",
        True,
        True,
        False,
    )
    assert s.cache_dir == places.ini_dir / "cache"
    assert s.code_dir == places.ini_dir / "code"
    assert s.repos == ("file:///a/index", "file:///b/index")


def test_command_line_beats_env_beats_ini(places: Places) -> None:
    env = {"PYTEST_DEVBOX": "centos-7"}
    assert resolve({}, reader(INI), places, env=env).distros == ["centos-7"]
    cli = {
        "distros": "fedora-42",
        "uri": "qemu:///session",
        "code_dir": "code",
        "repos": ["file:///c/index"],
        "keep": None,
    }
    resolved = resolve(cli, reader(INI), places, env=env)
    assert resolved.distros == ["fedora-42"]
    s = resolved.settings
    assert s.uri == "qemu:///session"
    # A command-line path is relative to where the command runs, not to the ini file.
    assert s.code_dir == places.cwd / "code"
    assert s.repos == ("file:///c/index",)
    assert s.keep is True  # not given on the command line: the ini decides
    # An explicit empty selection selects nothing, whatever env and ini say.
    assert resolve({"distros": ""}, reader(INI), places, env=env).distros == []


def test_toml_typed_ini_values(places: Places) -> None:
    # pyproject.toml gives real booleans and arrays; a face reading it raw passes them on.
    ini = {"devbox": ["debian-12"], "devbox_offline": True, "devbox_repo": ["file:///x"]}
    resolved = resolve({}, reader(ini), places, env={})
    assert resolved.distros == ["debian-12"]
    assert resolved.settings.offline is True
    assert resolved.settings.repos == ("file:///x",)


@pytest.mark.parametrize(
    ("cli", "ini", "message"),
    [
        ({"accel": "fast"}, {}, "--devbox-accel='fast': unknown accel 'fast': use auto, kvm or t*"),
        ({}, {"devbox_accel": "fast"}, "the devbox_accel ini option='fast': unknown accel"),
        ({"uri": "qemu"}, {}, "--devbox-uri='qemu': not a libvirt URI"),
        ({}, {"devbox_keep": "maybe"}, "the devbox_keep ini option='maybe': not a boolean"),
        ({"distros": "a,,b"}, {}, "--devbox='a,,b' contains an empty distro name"),
        ({"code_dir": "nowhere"}, {}, "code dir */cwd/nowhere does not exist"),
        ({"cache_dir": "afile"}, {}, "--devbox-cache='afile': */afile is not a directory"),
    ],
    ids=["accel", "accel-ini", "uri", "bool-ini", "empty-name", "code-dir", "cache-is-a-file"],
)
def test_bad_values_are_usage_errors_naming_their_source(
    places: Places, cli: dict[str, Any], ini: dict[str, Any], message: str
) -> None:
    (places.cwd / "afile").write_text("")
    with pytest.raises(pytest.UsageError) as e:
        resolve(cli, reader(ini), places, env={})
    assert fnmatch.fnmatch(str(e.value), f"devbox: *{message}*"), str(e.value)


def test_another_face_names_its_own_flags(places: Places) -> None:
    flags = {"accel": "--accel", "code_dir": "--code-dir"}
    with pytest.raises(pytest.UsageError, match="--accel='fast'"):
        resolve({"accel": "fast"}, reader({}), places, env={}, flags=flags)
    with pytest.raises(pytest.UsageError, match="point --code-dir "):
        resolve({"code_dir": "nowhere"}, reader({}), places, env={}, flags=flags)


def test_pytest_ini_bool_typo_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\ndevbox_keep = maybe\n")
    pytester.makepyfile("def test_plain(): pass")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*devbox: the devbox_keep ini option: *maybe*"])


def test_the_table_is_what_pytest_offers(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--help")
    text = result.stdout.str()
    for opt in OPTIONS:
        assert opt.flag in text
        assert f"  {opt.ini} (" in text
    fields = {f for f in Settings.__dataclass_fields__}
    assert {o.key for o in OPTIONS} - fields == {"distros"}


def test_the_default_uri_is_written_once() -> None:
    package = Path(pytest_devbox.__file__).parent
    where = {
        p.relative_to(package).as_posix(): p.read_text().count(DEFAULT_URI)
        for p in package.rglob("*.py")
    }
    assert sum(where.values()) == 1, {k: v for k, v in where.items() if v}
    assert where["config/settings.py"] == 1


def test_an_unwritable_cache_is_a_usage_error_before_any_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(): pass")
    r = pytester.runpytest_subprocess("--devbox-cache=/proc/nope", "-p", "no:cacheprovider")
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in r.errlines if "devbox" in line]
    assert len(errors) == 1, r.errlines
    assert "/proc/nope" in errors[0] and "--devbox-cache" in errors[0]
    assert "devbox_cache" in errors[0]
    assert "test_x" not in r.stdout.str()  # nothing ran


def test_a_writable_cache_is_made_when_missing(places: Places, tmp_path: Path) -> None:
    cache = tmp_path / "new" / "cache"
    settings = resolve({"cache_dir": str(cache)}, lambda name: None, places, env={}).settings
    assert settings.cache_dir == cache and cache.is_dir()

"""One configuration for both faces: the devbox command resolves every option to the
value the plugin resolves from the same project files and environment, and each face's
hints name its own flags."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pytest_devbox.cli.context import load_context
from pytest_devbox.cli.main import parse
from pytest_devbox.config.option_table import OPTIONS, spell_for_command
from pytest_devbox.plugin.hooks import state_key

PYTEST_9 = int(pytest.__version__.split(".")[0]) >= 9
ALL = """\
devbox = debian-11, debian-12
devbox_uri = test:///default
devbox_cache = cache
devbox_code_dir = code
devbox_accel = tcg
devbox_rebuild = yes
devbox_keep = true
devbox_offline = 1
devbox_repo =
    file:///a/index
    file:///b/index
"""
PYPROJECT_INI = """\
[tool.pytest.ini_options]
devbox = "debian-12"
devbox_offline = true
devbox_cache = "cache"
devbox_repo = ["file:///a/index"]

[tool.pytest-devbox.distros.mine]
extends = "debian-12"
memory_mib = 2048
"""
# Each project: its files, the folder both faces start in, extra environment.
PROJECTS: dict[str, tuple[dict[str, str], str, dict[str, str]]] = {
    "pytest.ini": ({"pytest.ini": "[pytest]\n" + ALL}, ".", {}),
    "tox.ini": ({"tox.ini": "[tox]\n[pytest]\n" + ALL}, ".", {}),
    "setup.cfg": ({"setup.cfg": "[metadata]\nname = x\n[tool:pytest]\n" + ALL}, ".", {}),
    "pyproject-ini-options": ({"pyproject.toml": PYPROJECT_INI}, ".", {}),
    "pyproject-from-a-subdir": ({"pyproject.toml": PYPROJECT_INI, "sub/x": ""}, "sub", {}),
    "pytest.ini-beats-pyproject": (
        {"pyproject.toml": PYPROJECT_INI, "pytest.ini": "[pytest]\ndevbox = debian-11\n"},
        ".",
        {},
    ),
    "env-beats-ini": (
        {"pyproject.toml": PYPROJECT_INI},
        ".",
        {"PYTEST_DEVBOX": "mine,centos-7", "PYTEST_DEVBOX_CACHE": "/tmp/devbox-env-cache"},
    ),
    "addopts-beat-env-and-ini": (
        {
            "pytest.ini": "[pytest]\ndevbox = debian-11\ndevbox_repo = file:///a\n"
            "addopts = -ra --devbox=debian-12 --devbox-repo=file:///b --devbox-keep\n"
        },
        ".",
        {"PYTEST_DEVBOX": "centos-7", "PYTEST_ADDOPTS": "--devbox-uri=test:///default"},
    ),
    "no-config-file": ({"setup.py": "", "sub/x": ""}, "sub", {}),
}
if PYTEST_9:
    PROJECTS["pyproject-native-toml"] = (
        {
            "pyproject.toml": '[tool.pytest]\ndevbox = "debian-11"\ndevbox_keep = true\n'
            'devbox_repo = ["file:///a", "file:///b"]\ndevbox_code_dir = "."\n'
        },
        ".",
        {},
    )


@pytest.mark.parametrize("case", sorted(PROJECTS))
def test_both_faces_resolve_every_option_alike(
    case: str, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    files, start, env = PROJECTS[case]
    for name, text in files.items():
        path = pytester.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for folder in ("cache", "code"):
        (pytester.path / folder).mkdir()
    for key in ("PYTEST_DEVBOX", "PYTEST_DEVBOX_CACHE", "PYTEST_ADDOPTS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(pytester.path / start)

    config = pytester.parseconfigure()  # the plugin, in this very project and env
    plugin = config.stash[state_key]
    ctx = load_context(parse(["up"]))  # the command, with no flag of its own

    assert ctx.project.rootdir == config.rootpath
    assert ctx.project.inipath == config.inipath
    assert ctx.settings == plugin.settings
    assert ctx.distros == plugin.selected_names
    assert ctx.profiles == plugin.profiles
    # Flags on top: the command's as pytest's (a repeated one adds to addopts' too).
    config = pytester.parseconfigure(
        "--devbox-uri=test:///x", "--devbox-repo=file:///c", "--devbox=centos-8"
    )
    ctx = load_context(parse(["up", "--uri", "test:///x", "--repo", "file:///c", "centos-8"]))
    assert ctx.settings == config.stash[state_key].settings
    assert ctx.distros == config.stash[state_key].selected_names == ["centos-8"]


def test_a_bad_ini_value_is_a_usage_error_of_both_faces(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    pytester.makeini("[pytest]\ndevbox_accel = fast\n")
    pytester.makepyfile("def test_plain(): pass")
    assert pytester.runpytest().ret == pytest.ExitCode.USAGE_ERROR
    r = subprocess.run(
        [sys.executable, "-m", "pytest_devbox.cli", "ls", "--uri", "test:///default"],
        cwd=pytester.path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 2
    assert r.stderr == (
        "devbox: error: the devbox_accel ini option='fast': unknown accel 'fast': "
        "use auto, kvm or tcg\n"
    )


def test_spelling_for_the_command() -> None:
    for opt in OPTIONS:
        if opt.cli:
            assert spell_for_command(f"use {opt.flag} now") == f"use {opt.cli} now"
    text = "--devbox-accel=kvm; --devbox-cache DIR; --devbox-code-dir. --devbox=debian-12"
    assert spell_for_command(text) == "--accel=kvm; --cache DIR; --code-dir. --devbox=debian-12"
    assert spell_for_command("devbox-ssh-keygen --devbox-nosuch") == (
        "devbox-ssh-keygen --devbox-nosuch"
    )


def _project(root: Path) -> Path:
    """A project like examples/: devbox_offline = true in its pyproject.toml."""
    (root / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [tool.pytest.ini_options]
            devbox_offline = true
            """
        )
    )
    (root / "test_it.py").write_text("def test_guest(devbox):\n    pass\n")
    return root


def test_offline_from_the_project_and_hints_in_each_faces_flags(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    # No repository offers centos-7 offline: the layer below says to drop the flag.
    project = _project(pytester.path)
    cache = tmp_path / "cache"
    r = subprocess.run(
        [sys.executable, "-m", "pytest_devbox.cli", "build", "centos-7", "--cache", str(cache)],
        cwd=project,
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 1, r.stderr
    assert "searched: no repository" in r.stderr  # offline came from pyproject.toml
    assert "drop --offline." in r.stderr and "--devbox-offline" not in r.stderr
    assert "Traceback" not in r.stderr
    result = pytester.runpytest(f"--devbox-cache={cache}", "--devbox=centos-7")
    result.assert_outcomes(errors=1)
    assert "drop --devbox-offline." in result.stdout.str()

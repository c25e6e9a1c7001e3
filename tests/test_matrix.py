"""For a CI: `pytest --devbox-matrix` (the distros as JSON) and `devbox key` (the image
cache key). No guest, no libvirt: an index file in a temporary cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_images import write_index

from pytest_devbox.cli.main import main
from pytest_devbox.config.profiles import BUILTIN_PROFILES, load_profiles, select
from pytest_devbox.config.settings import Settings
from pytest_devbox.pool.pool import Pool


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PYTEST_DEVBOX", raising=False)
    monkeypatch.setenv("PYTEST_DEVBOX_CACHE", str(tmp_path / "cache"))


def test_matrix_prints_the_selected_distros_as_json(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_never(): raise AssertionError('collected')")
    result = pytester.runpytest_subprocess("--devbox-matrix", "--devbox=debian-12,debian-11")
    assert result.ret == 0
    assert json.loads(result.stdout.str()) == ["debian-12", "debian-11"]


def test_matrix_of_all_or_of_nothing_selected_is_every_profile(
    pytester: pytest.Pytester,
) -> None:
    every = sorted(BUILTIN_PROFILES)
    for args in (["--devbox=all"], []):
        result = pytester.runpytest_subprocess("--devbox-matrix", *args)
        assert result.ret == 0
        assert json.loads(result.stdout.str()) == every


def test_matrix_reads_the_ini_selection_and_rejects_unknown_names(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini("[pytest]\ndevbox = debian-11\n")
    result = pytester.runpytest_subprocess("--devbox-matrix")
    assert json.loads(result.stdout.str()) == ["debian-11"]
    result = pytester.runpytest_subprocess("--devbox-matrix", "--devbox=debian-99")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown distro 'debian-99'*"])


def test_key_is_the_key_the_plugin_caches_the_image_under(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "cache"
    write_index(root, {"debian-11": 1, "debian-12": 3})
    argv = ["key", "--cache", str(root), "--offline", "--project", str(tmp_path)]
    assert main([*argv, "debian-12"]) == 0
    key = capsys.readouterr().out.strip()
    profile = select(["debian-12"], load_profiles(tmp_path))[0]
    plugin = Pool([profile], Settings(cache_dir=root, offline=True), log=lambda s: None)
    assert key == plugin.cache.key_for(profile)
    assert plugin.cache.image_path(profile).name == f"debian-12-{key}.qcow2"

    assert main([*argv, "debian-11", "debian-12"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == f"debian-12 {key}" and lines[0].startswith("debian-11 ")

    # A new template revision is a new image: the CI cache must miss.
    write_index(root, {"debian-11": 1, "debian-12": 4})
    assert main([*argv, "debian-12"]) == 0
    assert capsys.readouterr().out.strip() != key

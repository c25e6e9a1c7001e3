"""Each option reaches what it drives, from the command line and from the ini file:
--devbox-rebuild the image cache, --devbox-keep and --devbox-keep-failed the domain,
--devbox-offline and --devbox-repo the repositories, and a session's first guest the sweep.

Real pytest runs (pytester) on libvirt's test:///default driver with a seeded temporary
cache (seeded_cache.py): each start stops early, at a point that shows the option.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from seeded_cache import TEST_URI, dead_pid, leftover_run_dir, seed_cache

from pytest_devbox.config.profiles import BUILTIN_PROFILES
from pytest_devbox.image.virt_builder import PUBLIC_INDEX
from pytest_devbox.plugin.hooks import state_key

TEST = "def test_guest(devbox):\n    pass\n"
BUILDING = "devbox: [debian-12] building image from template 'debian-12'"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTEST_DEVBOX", raising=False)
    monkeypatch.delenv("PYTEST_DEVBOX_CACHE", raising=False)


def _options(pytester: pytest.Pytester, where: str, cache: Path, **extra: str) -> list[str]:
    """Select debian-12 on the test driver with ``cache``, plus ``extra`` options (by ini
    name), given on the command line or in the ini file; the pytest arguments."""
    values = {
        "devbox": "debian-12",
        "devbox_uri": TEST_URI,
        "devbox_cache": str(cache),
        "devbox_accel": "tcg",
        "devbox_offline": "true",
        **extra,
    }
    if where == "ini":
        lines = [f"{k} = {v}".replace("\n", "\n    ") for k, v in values.items()]
        pytester.makeini("[pytest]\n" + "\n".join(lines) + "\n")
        return []
    args = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if value == "true":
            args.append(flag)
        elif value != "false":
            args += [f"{flag}={v}" for v in value.splitlines()]
    return args


def _run(pytester: pytest.Pytester, args: list[str]) -> str:
    pytester.makepyfile(TEST)
    result = pytester.runpytest(*args)
    result.assert_outcomes(errors=1)  # no guest can boot on the test driver
    return result.stdout.str()


WHERE = pytest.mark.parametrize("where", ["flag", "ini"])


@WHERE
def test_the_session_start_sweeps_dead_sessions(
    pytester: pytest.Pytester, tmp_path: Path, where: str
) -> None:
    cache = tmp_path / "cache"
    dead = leftover_run_dir(cache, "rdead0001", dead_pid())
    out = _run(pytester, _options(pytester, where, cache))
    assert not dead.exists()
    assert f"devbox: removed leftover run directory {dead}" in out


@pytest.mark.skipif(shutil.which("virt-builder") is None, reason="needs guestfs-tools")
@WHERE
def test_rebuild_reaches_the_image_cache(
    pytester: pytest.Pytester, tmp_path: Path, where: str
) -> None:
    seed_cache(tmp_path / "cache")
    out = _run(pytester, _options(pytester, where, tmp_path / "cache"))
    assert BUILDING not in out  # the cached image is used
    out = _run(pytester, _options(pytester, where, tmp_path / "cache", devbox_rebuild="true"))
    assert BUILDING in out
    assert "could not start debian-12: virt-builder failed" in out


@WHERE
def test_keep_reaches_the_domain(pytester: pytest.Pytester, tmp_path: Path, where: str) -> None:
    # The test driver refuses AUTODESTROY; a kept guest is created without it and gets
    # as far as forwarding its SSH port, which needs QEMU.
    seed_cache(tmp_path / "cache")
    out = _run(pytester, _options(pytester, where, tmp_path / "cache"))
    assert "could not start debian-12: libvirt could not start devbox-debian-12-" in out
    out = _run(pytester, _options(pytester, where, tmp_path / "cache", devbox_keep="true"))
    assert "QEMU monitor command" in out and "libvirt could not start" not in out


@WHERE
def test_keep_failed_reaches_the_domain(
    pytester: pytest.Pytester, tmp_path: Path, where: str
) -> None:
    # A guest that may be kept after a failure starts without AUTODESTROY (which the test
    # driver refuses), like a kept one: it gets as far as forwarding its SSH port.
    seed_cache(tmp_path / "cache")
    extra = {"devbox_keep_failed": "true"}
    out = _run(pytester, _options(pytester, where, tmp_path / "cache", **extra))
    assert "QEMU monitor command" in out and "libvirt could not start" not in out


@WHERE
def test_offline_and_repos_reach_the_image_cache(
    pytester: pytest.Pytester, tmp_path: Path, where: str
) -> None:
    repos = [tmp_path / "a" / "index", tmp_path / "b" / "index"]
    cache = tmp_path / "cache"

    def repo_uris(**extra: str) -> list[str]:
        config = pytester.parseconfigure(*_options(pytester, where, cache, **extra))
        pool = config.stash[state_key].pool
        return pool.cache.builder.repo_uris(BUILTIN_PROFILES["debian-12"])

    assert repo_uris(devbox_offline="false") == [PUBLIC_INDEX]
    assert repo_uris() == []
    listed = "\n".join(str(r) for r in repos)
    assert repo_uris(devbox_repo=listed) == [r.as_uri() for r in repos]
    # And a run reads them: a missing one is named in the error.
    out = _run(pytester, _options(pytester, where, cache, devbox_repo=str(repos[0])))
    assert f"the index {repos[0].as_uri()} cannot be read" in out

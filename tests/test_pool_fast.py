"""The Pool without a guest: libvirt's test:///default driver and a temporary cache.

What runs is real: the sweep, the image cache (a small real qcow2), the run dir, libvirt's
test driver refusing what it cannot do. Boots on QEMU are test_pool.py's (VM tier).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from seeded_cache import TEST_URI, dead_pid, leftover_run_dir, seed_cache

from pytest_devbox.config.profiles import BUILTIN_PROFILES
from pytest_devbox.config.settings import Settings
from pytest_devbox.errors import DomainError, ImageBuildError, UnknownDistro
from pytest_devbox.host.layout import CacheLayout
from pytest_devbox.image.virt_builder import PUBLIC_INDEX
from pytest_devbox.pool.pool import Pool

DEBIAN_12 = BUILTIN_PROFILES["debian-12"]
BAD_URI = "qemu:///system?socket=/nonexistent/libvirt-sock"


def _settings(tmp_path: Path, **kw: object) -> Settings:
    args: dict[str, object] = {
        "uri": TEST_URI,
        "cache_dir": tmp_path / "cache",
        "code_dir": tmp_path,
        "accel": "tcg",
        "offline": True,
    }
    args.update(kw)
    return Settings(**args)  # type: ignore[arg-type]


def test_a_pool_is_cheap_until_a_guest_is_needed(tmp_path: Path) -> None:
    # An unreachable libvirt and no cache dir: creating and closing touch neither.
    pool = Pool([DEBIAN_12], _settings(tmp_path, uri=BAD_URI))
    assert pool.distros == ["debian-12"]
    assert pool.stats["debian-12"].boots == 0
    assert pool.close() == []
    assert not (tmp_path / "cache").exists()


def test_unknown_distro_names_the_sessions_distros(tmp_path: Path) -> None:
    pool = Pool([DEBIAN_12], _settings(tmp_path, uri=BAD_URI))
    with pytest.raises(UnknownDistro, match=r"'centos-7' is not one of .*: debian-12"):
        pool.get("centos-7")


def test_the_first_start_sweeps_dead_sessions_once(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    dead = leftover_run_dir(cache, "rdead0001", dead_pid())
    alive = leftover_run_dir(cache, "ralive001", os.getpid())
    lines: list[str] = []
    pool = Pool([DEBIAN_12], _settings(tmp_path), log=lines.append)
    # No template anywhere: the start fails, but only after the sweep.
    with pytest.raises(ImageBuildError, match="devbox template build debian-12"):
        pool.get("debian-12")
    assert not dead.exists()
    assert alive.is_dir()  # its owner (this process) is alive
    assert f"removed leftover run directory {dead}" in lines
    # Once per session: a leftover appearing later waits for the next session.
    later = leftover_run_dir(cache, "rdead0002", dead_pid())
    with pytest.raises(ImageBuildError):
        pool.get("debian-12")
    assert later.is_dir()
    pool.close()


def test_the_image_cache_follows_the_settings(tmp_path: Path) -> None:
    repo = tmp_path / "repo" / "index"
    pool = Pool([DEBIAN_12], _settings(tmp_path, repos=(str(repo),), offline=True))
    cache = pool.cache
    assert cache.root == tmp_path / "cache"
    assert cache.builder.tcg is True
    assert cache.builder.repo_uris(DEBIAN_12) == [repo.as_uri()]
    online = Pool([DEBIAN_12], _settings(tmp_path, offline=False)).cache
    assert online.builder.repo_uris(DEBIAN_12) == [PUBLIC_INDEX]


def test_a_failed_start_leaves_no_run_dir_after_close(tmp_path: Path) -> None:
    seed_cache(tmp_path / "cache")
    pool = Pool([DEBIAN_12], _settings(tmp_path))
    run_dir = CacheLayout(tmp_path / "cache").run(pool.run_id)
    # Past the image cache: the test driver refuses AUTODESTROY, as a libvirtd may.
    with pytest.raises(DomainError, match="could not start devbox-debian-12-"):
        pool.get("debian-12")
    assert run_dir.is_dir() and not list(run_dir.glob("*.qcow2"))  # overlay gone at once
    assert pool.stats["debian-12"].boots == 0
    pool.close()
    assert not run_dir.exists()


@pytest.mark.skipif(shutil.which("virt-builder") is None, reason="needs guestfs-tools")
def test_rebuild_is_asked_of_the_image_cache(tmp_path: Path) -> None:
    image = seed_cache(tmp_path / "cache")
    before = image.read_bytes()
    lines: list[str] = []
    pool = Pool([DEBIAN_12], _settings(tmp_path, rebuild=True), log=lines.append)
    # The cached image is sound, yet a rebuild runs virt-builder (which finds no
    # template file here) and the old image stays as it was.
    with pytest.raises(ImageBuildError, match="virt-builder failed"):
        pool.get("debian-12")
    pool.close()
    assert "[debian-12] building image from template 'debian-12'" in lines
    assert image.read_bytes() == before
    assert not image.with_name(image.name + ".partial").exists()

"""Faults a user meets, each with the clear error it must produce."""

from __future__ import annotations

import os
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_devbox.config.profiles import BUILTIN_PROFILES
from pytest_devbox.errors import DevboxError, GuestDied, HostNotReady, ImageBuildError
from pytest_devbox.guest.machine import Machine
from pytest_devbox.host.layout import default_cache_dir
from pytest_devbox.image.cache import ImageCache
from pytest_devbox.image.templates.repository import default_repo_dir
from pytest_devbox.image.virt_builder import PUBLIC_INDEX
from pytest_devbox.virt import domain as dom

DEBIAN_12 = BUILTIN_PROFILES["debian-12"]
CACHE = default_cache_dir()


def test_virt_builder_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # a host without guestfs-tools
    with pytest.raises(HostNotReady, match="guestfs-tools"):
        ImageCache(tmp_path / "cache", public_index=False).image_for(DEBIAN_12)


def _public_index_reachable() -> bool:
    try:
        with urllib.request.urlopen(PUBLIC_INDEX, timeout=5):
            return True
    except OSError:
        return False


def test_unreachable_public_index_suggests_offline(tmp_path: Path) -> None:
    if _public_index_reachable():
        pytest.skip("this host reaches the public virt-builder index")
    with pytest.raises(DevboxError, match="--devbox-offline"):
        ImageCache(tmp_path / "cache", public_index=True).image_for(DEBIAN_12)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.vm
def test_disk_full_during_build(small_tmpfs: Path) -> None:
    local = default_repo_dir(CACHE) / "index"
    assert local.exists(), "build the debian-12 template first"
    cache = ImageCache(small_tmpfs, repos=(f"file://{local}",), public_index=False)
    with pytest.raises(ImageBuildError) as info:
        cache.image_for(DEBIAN_12)
    assert "full" in str(info.value) and "--devbox-cache" in str(info.value)
    images = small_tmpfs / "images"
    assert not [p for p in images.iterdir() if p.suffix in (".qcow2", ".partial")]


@pytest.mark.vm
def test_guest_that_dies_fails_at_once(tmp_path: Path) -> None:
    cache = ImageCache(CACHE, public_index=False)
    cache.image_for(DEBIAN_12)  # not part of what we time
    outcome: list[BaseException] = []

    def boot() -> None:
        try:
            Machine.start(DEBIAN_12, cache=cache, code_dir=tmp_path, boot_timeout=600).close()
        except BaseException as e:
            outcome.append(e)

    conn = dom.connect("qemu:///system")
    mine = str(os.getpid())

    def ours() -> set[str]:  # only this process's guests: never another session's
        return {n for n, m in dom.list_devbox_domains(conn) if m.get("owner_pid") == mine}

    before = ours()
    thread = threading.Thread(target=boot)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while not (new := ours() - before):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(2)  # into the boot
        conn.lookupByName(new.pop()).destroy()  # what a crash looks like from outside
        killed = time.monotonic()
        thread.join(timeout=300)
        assert not thread.is_alive()
        assert outcome and isinstance(outcome[0], GuestDied), outcome
        # Not the 600 s deadline; generous, as a busy 2-core host is slow to notice.
        assert time.monotonic() - killed < 120
        assert "stopped while booting" in str(outcome[0])
    finally:
        thread.join(timeout=600)
        conn.close()

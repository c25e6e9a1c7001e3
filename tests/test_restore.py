"""Restored guests on the real host (VM tier): usable, pristine, distinct, and gone with
their process however it ends.

The first run on a cache saves a booted debian-11 (9p) guest into each restore slot it
needs (a boot each, once); later runs restore in seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from guest_session import NINE_P_PROJECT

from pytest_devbox.config.profiles import Profile, load_profiles
from pytest_devbox.config.settings import Settings
from pytest_devbox.guest.machine import Machine
from pytest_devbox.image.cache import ImageCache
from pytest_devbox.pool.pool import Pool
from pytest_devbox.virt import domain as dom

pytestmark = pytest.mark.vm

URI = "qemu:///system"
PROJECT = NINE_P_PROJECT


@pytest.fixture(scope="module")
def profile(tmp_path_factory: pytest.TempPathFactory) -> Profile:
    project = tmp_path_factory.mktemp("project")
    (project / "pyproject.toml").write_text(PROJECT)
    return load_profiles(project)["debian-11-9p"]


def _restore(profile: Profile, cache: ImageCache, code_dir: Path) -> Machine:
    return Machine.restore(profile, cache=cache, code_dir=code_dir, uri=URI)


def _urandom(m: Machine) -> str:
    return m.run("head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'", cwd=None).stdout


@pytest.mark.host_tier
def test_restored_guests_are_usable_pristine_and_distinct(
    profile: Profile, cache: ImageCache, code_dir: Path
) -> None:
    first = _restore(profile, cache, code_dir)
    try:
        assert first.started == "restored"
        # /code is mounted over 9p, writable by the guest user, and is the host's dir.
        assert "9p" in first.run("findmnt -no FSTYPE /code").stdout
        assert first.run("cat /code/from-host.txt").stdout == "written on the host\n"
        first.run("echo from-first > /code/restored-first.txt", user="devbox")
        assert (code_dir / "restored-first.txt").read_text() == "from-first\n"
        # The clock was stepped from the save's moment to now.
        guest_now = float(first.run("date +%s.%N", cwd=None).stdout)
        assert abs(guest_now - time.time()) < 2.0
        first.run("touch /root/written-in-first", user="root")
        first_bytes = _urandom(first)
        # A second clone at the same time: another slot, another name, both running.
        second = _restore(profile, cache, code_dir)
        try:
            assert second.name != first.name
            assert first.domain.is_running() and second.domain.is_running()
            assert (
                second.run("test -e /root/written-in-first", check=False, user="root").exit_status
                == 1
            )
            assert _urandom(second) != first_bytes
            assert second.run("cat /code/restored-first.txt").stdout == "from-first\n"
            second.run("echo from-second > /code/restored-second.txt", user="devbox")
            assert (code_dir / "restored-second.txt").read_text() == "from-second\n"
            kernel = second.run("uname -r; grep -cw rdrand /proc/cpuinfo", cwd=None).stdout
            print(f"two clones ran at once ({' '.join(kernel.split())}: kernel, rdrand cpus)")
        finally:
            second.close()
    finally:
        first.close()
    assert not first.overlay.exists() and not second.overlay.exists()


def test_the_pool_restores_shared_and_fresh_guests(
    profile: Profile, cache: ImageCache, code_dir: Path
) -> None:
    lines: list[str] = []
    settings = Settings(uri=URI, cache_dir=cache.root, code_dir=code_dir, offline=True)
    pool = Pool([profile], settings, log=lines.append)
    pool._cache = cache  # the test cache's guest user, so the image is a cache hit
    try:
        shared = pool.get(profile.name)
        with pool.fresh(profile.name) as fresh:
            assert fresh.name != shared.name
            fresh.run("true")
        assert shared.run("true").ok
    finally:
        pool.close()
    stats = pool.stats[profile.name]
    assert (stats.restores, stats.boots) == (2, 0), lines
    assert stats.restore_seconds is not None
    print(f"restored in {stats.restore_seconds:.1f} s; log: {lines}")


HOLD = """
import sys, time
from pathlib import Path
from pytest_devbox.config.profiles import load_profiles
from pytest_devbox.image.cache import ImageCache
from pytest_devbox.guest.machine import Machine
profile = load_profiles(Path(sys.argv[1]))["debian-11-9p"]
cache = ImageCache(Path(sys.argv[2]), public_index=False, guest_user=("devbox", 4242, 4242)
                   if sys.argv[4] == "0" else None)
m = Machine.restore(profile, cache=cache, code_dir=Path(sys.argv[3]), log=lambda _: None)
print("READY", m.name, flush=True)
time.sleep(600)
"""


def _domains_of(pid: int) -> list[str]:
    conn = dom.connect(URI)
    try:
        return [n for n, m in dom.list_devbox_domains(conn) if m.get("owner_pid") == str(pid)]
    finally:
        conn.close()


def _wait_for(cond: Callable[[], bool], timeout: float) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            return -1.0
        time.sleep(0.2)
    return time.monotonic() - t0


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_a_dead_owner_leaves_no_restored_guest(
    profile: Profile, cache: ImageCache, code_dir: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text(textwrap.dedent(PROJECT))
    as_root = "0" if os.geteuid() == 0 else "1"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(project), str(cache.root), str(code_dir), as_root],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a job of its own, as in a terminal
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("READY"), line
        name = line.split()[1]
        assert _domains_of(proc.pid) == [name]
        os.killpg(proc.pid, sig)  # the whole job, as the terminal (or a CI runner) does
        proc.wait(timeout=60)
        seconds = _wait_for(lambda: not _domains_of(proc.pid), 10.0)
        assert seconds >= 0, f"{name} still runs 10 s after its owner got {sig.name}"
        print(f"{sig.name}: {name} gone {seconds:.1f} s after its owner ended")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

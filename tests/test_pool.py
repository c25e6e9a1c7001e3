"""Pool behaviour on real guests: the boot retry, and --devbox-keep (VM tier)."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from guest_session import pytest_on_debian12, system_domains

from pytest_devbox.config.profiles import BUILTIN_PROFILES
from pytest_devbox.config.settings import Settings
from pytest_devbox.errors import BootTimeout
from pytest_devbox.host.layout import default_cache_dir
from pytest_devbox.pool.pool import Pool

pytestmark = pytest.mark.vm

CACHE = default_cache_dir()
URI = "qemu:///system"


def test_failed_boot_is_retried_once_and_reported(tmp_path: Path) -> None:
    lines: list[str] = []
    settings = Settings(
        uri=URI, cache_dir=CACHE, code_dir=tmp_path, offline=True, boot_timeout=1, restore="off"
    )
    pool = Pool([BUILTIN_PROFILES["debian-12"]], settings, log=lines.append)
    try:
        with pytest.raises(BootTimeout):
            pool.get("debian-12")
    finally:
        pool.close()
    assert pool.stats["debian-12"].retried == 1
    assert any("retrying once" in line for line in lines), lines
    # None of this pool's guests is left (the session's shared guests are not its own).
    assert not [n for n, m in system_domains().items() if m.get("run_id") == pool.run_id]


def test_keep_is_the_only_way_a_guest_outlives_its_session(tmp_path: Path) -> None:
    # Two guests of one distro in one session (shared and fresh): each keeps its own
    # name and overlay (they used to collide under --devbox-keep).
    (tmp_path / "test_keep.py").write_text(
        "def test_up(devbox):\n    devbox.run('touch /root/kept', user='root')\n"
        "def test_fresh(devbox_fresh):\n    devbox_fresh.run('touch /root/fresh', user='root')\n"
    )
    proc = subprocess.Popen(
        pytest_on_debian12("--devbox-keep", "test_keep.py"),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    stdout, _ = proc.communicate(timeout=900)
    r = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, "")
    # Selected by owner: another session's guests, kept or not, are none of our business.
    kept = {n for n, m in system_domains().items() if m.get("owner_pid") == str(proc.pid)}
    assert r.returncode == 0, r.stdout
    try:
        assert len(kept) == 2, r.stdout
        overlays = {system_domains()[n]["overlay"] for n in kept}
        assert len(overlays) == 2 and all(Path(o).exists() for o in overlays)
        # Each printed line works: each guest is the one its test used.
        marks = set()
        for name in kept:
            assert name in r.stdout and "kept running" in r.stdout
            ssh_line = next(ln for ln in r.stdout.splitlines() if name in ln and "ssh " in ln)
            argv = shlex.split(ssh_line.split(": ", 2)[-1])
            out = subprocess.run(
                [*argv, "-o", "BatchMode=yes", "ls /root"],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert out.returncode == 0, out.stderr
            marks.add(out.stdout.strip())
        assert marks == {"kept", "fresh"}
        # Not swept by the next session, though their owner is gone.
        from pytest_devbox.guest.sweep import sweep_leftovers

        sweep_leftovers(URI, CACHE)
        assert kept <= set(system_domains())
    finally:
        subprocess.run(
            [sys.executable, "-m", "pytest_devbox.cli", "destroy", "--cache", str(CACHE), *kept],
            check=False,
        )
    assert not kept & set(system_domains())

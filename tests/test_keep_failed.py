"""--devbox-keep-failed on real guests: a failed test's guest stays up, reachable by the
printed ssh line and found by `devbox ls/destroy`; a passing test's guest goes (VM tier)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from guest_session import pytest_on_debian12, system_domains

from pytest_devbox.host.layout import CacheLayout, default_cache_dir

pytestmark = pytest.mark.vm

CACHE = default_cache_dir()
URI = "qemu:///system"
FAILING = """
def test_passes_on_its_own_guest(devbox_fresh):
    devbox_fresh.run("true")

def test_fails(devbox):
    devbox.run("touch /root/failed-here", user="root")
    assert devbox.run("echo 1").stdout.strip() == "2"
"""


def _session(tmp_path: Path, test: str) -> tuple[int, int, str]:
    """Run `test` with --devbox-keep-failed; (its pid, exit status, output)."""
    (tmp_path / "test_it.py").write_text(test)
    proc = subprocess.Popen(
        pytest_on_debian12("--devbox-keep-failed", "test_it.py"),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out, _ = proc.communicate(timeout=1200)
    return proc.pid, proc.returncode, out


def _devbox(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "pytest_devbox.cli", *args, "--cache", str(CACHE)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def test_a_failed_tests_guest_stays_up_and_is_reachable(tmp_path: Path) -> None:
    pid, status, out = _session(tmp_path, FAILING)
    # Selected by owner: other sessions' guests are none of our business.
    ours = {n: m for n, m in system_domains().items() if m.get("owner_pid") == str(pid)}
    try:
        assert status == 1, out
        # The shared guest of the failed test stays; the passing test's fresh one went.
        assert len(ours) == 1, out
        name, meta = next(iter(ours.items()))
        assert meta["keep"] == "1" and Path(meta["overlay"]).is_file()
        assert "devbox kept" in out  # the failure report's section names it
        line = next(ln for ln in out.splitlines() if name in ln and "kept running" in ln)
        assert "test_it.py::test_fails[debian-12] failed" in line and "shared guest" in line
        argv = shlex.split(line.split("): ", 1)[1])
        probe = subprocess.run(
            [*argv, "-o", "BatchMode=yes", "ls /root"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert probe.returncode == 0 and probe.stdout.split() == ["failed-here"], probe
        listed = {r["name"]: r for r in json.loads(_devbox("ls", "--json").stdout)}
        assert listed[name]["kept"] is True and listed[name]["ssh"] == argv
        assert listed[name]["failed"] == "test_it.py::test_fails[debian-12]"
        # The next session's sweep leaves it alone, though its owner is gone.
        from pytest_devbox.guest.sweep import sweep_leftovers

        sweep_leftovers(URI, CACHE)
        assert name in system_domains()
    finally:
        destroyed = _devbox("destroy", *ours)
    assert destroyed.returncode == 0, destroyed.stderr
    assert not set(ours) & set(system_domains())
    assert not Path(meta["overlay"]).exists()
    assert not (CacheLayout(CACHE).kept / f"{name}.json").exists()


def test_a_passing_run_keeps_nothing(tmp_path: Path) -> None:
    pid, status, out = _session(tmp_path, "def test_ok(devbox):\n    devbox.run('true')\n")
    ours = [n for n, m in system_domains().items() if m.get("owner_pid") == str(pid)]
    if ours:  # pragma: no cover - only when the test fails
        _devbox("destroy", *ours)
    assert status == 0, out
    assert ours == [] and "kept running" not in out
    records = [json.loads(p.read_text()) for p in CacheLayout(CACHE).kept.glob("*.json")]
    assert not [r for r in records if "test_it.py" in r.get("failed", "")]

"""The devbox command: doctor, template, and argument errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_devbox.cli import main

ROOT = Path(__file__).resolve().parent.parent
SOCK = Path("/run/libvirt/libvirt-sock")


def devbox(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_devbox.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.vm  # asks the host's libvirtd
def test_doctor_ok_on_this_host() -> None:
    r = devbox("doctor")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[ok  ] libvirt" in r.stdout
    assert "accel" in r.stdout


@pytest.mark.vm
def test_doctor_json() -> None:
    r = devbox("doctor", "--json")
    checks = {c["name"]: c for c in json.loads(r.stdout)}
    assert {"libvirt", "accel", "virt-builder", "qemu-img", "cache"} <= set(checks)
    assert checks["libvirt"]["ok"] is True


def test_doctor_fails_on_unreachable_libvirt(tmp_path: Path) -> None:
    r = devbox("doctor", "--uri", f"qemu:///system?socket={tmp_path}/none", "--json")
    assert r.returncode == 1
    libvirt = next(c for c in json.loads(r.stdout) if c["name"] == "libvirt")
    assert not libvirt["ok"] and "libvirtd is not running" in libvirt["detail"]
    assert "libvirtd -d" in libvirt["fix"]


def _libvirtd_pid() -> int | None:
    out = subprocess.run(["pidof", "libvirtd"], capture_output=True, text=True, check=False)
    return int(out.stdout.split()[0]) if out.stdout.strip() else None


@pytest.mark.vm
@pytest.mark.host_service
@pytest.mark.skipif(
    os.environ.get("CI") != "true"
    or os.geteuid() != 0
    or Path("/proc/1/comm").read_text().strip() == "systemd",
    reason="stops and restarts libvirtd by hand: root on a host without systemd only",
)
def test_doctor_with_libvirtd_stopped_then_setup_host() -> None:
    pid = _libvirtd_pid()
    assert pid, "libvirtd should be running before this test"
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while _libvirtd_pid() and time.monotonic() < deadline:
        time.sleep(0.2)
    if _libvirtd_pid():  # libvirtd can hang in shutdown; this test is about doctor
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
    try:
        r = devbox("doctor")
        assert r.returncode == 1
        line = next(ln for ln in r.stdout.splitlines() if ln.startswith("[FAIL] libvirt"))
        assert "libvirtd is not running" in line
        assert "libvirtd -d" in r.stdout
    finally:
        setup = subprocess.run(
            [str(ROOT / "scripts" / "setup-host")], capture_output=True, text=True, check=False
        )
    assert setup.returncode == 0, setup.stdout + setup.stderr
    assert "started libvirtd" in setup.stdout
    assert devbox("doctor").returncode == 0


def test_template_build_unknown_distro(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["template", "build", "debian-99", "--repo", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "debian-99" in err and "debian-12" in err


def test_build_unknown_distro_lists_known(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["build", "nosuch", "--offline"]) == 2
    err = capsys.readouterr().err
    assert "nosuch" in err and "centos-7" in err and "debian-12" in err


@pytest.mark.vm
def test_destroy_nothing_matching() -> None:
    r = devbox("destroy", "devbox-no-such-guest")
    assert r.returncode == 1 and "no matching devbox guest" in r.stdout

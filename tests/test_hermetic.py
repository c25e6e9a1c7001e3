"""The default tier is safe to run on a workstation: next to another session's running
guest, `pytest -m "not vm"` leaves that guest, libvirtd, the domain list and the default
cache directory exactly as they were (VM tier: it needs a real guest to stand beside)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from guests import CACHE, URI

from pytest_devbox import domain as dom
from pytest_devbox.machine import Machine

pytestmark = pytest.mark.vm
ROOT = Path(__file__).resolve().parent.parent


def _libvirtd_pid() -> str:
    return subprocess.run(["pidof", "libvirtd"], capture_output=True, text=True).stdout.strip()


def _domains() -> set[str]:
    conn = dom.connect(URI)
    try:
        return {name for name, _meta in dom.list_devbox_domains(conn)}
    finally:
        conn.close()


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of everything under the cache, the running guest's files aside
    (its overlay and console log change while it runs)."""
    found = {}
    for p in root.rglob("*"):
        if p.is_file() and "run" not in p.relative_to(root).parts[:1]:
            st = p.stat()
            found[str(p)] = (st.st_size, st.st_mtime_ns)
    return found


def test_fast_tier_leaves_host_alone(debian12: Machine) -> None:
    before = (_libvirtd_pid(), _domains(), _tree(CACHE))
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_DEVBOX_HOST_TESTS")}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "not vm", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert debian12.domain.is_running()
    assert debian12.run("echo alive").stdout == "alive\n"
    after = (_libvirtd_pid(), _domains(), _tree(CACHE))
    assert after[0] == before[0], "libvirtd was restarted"
    assert after[1] == before[1], "the set of devbox domains changed"
    changed = {p for p in before[2].keys() | after[2].keys() if before[2].get(p) != after[2].get(p)}
    assert not changed, f"the fast tier changed the default cache: {sorted(changed)}"

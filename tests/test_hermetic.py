"""The default tier is safe to run on a workstation: next to another session's running
guest, `pytest -m "not vm"` leaves that guest, libvirtd, the domain list and the default
cache directory exactly as they were (VM tier: it needs a real guest to stand beside)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from guest_session import system_domains
from guests import CACHE, URI

from pytest_devbox.guest.machine import Machine

pytestmark = pytest.mark.vm
ROOT = Path(__file__).resolve().parent.parent


def _libvirtd_pid() -> str:
    return subprocess.run(["pidof", "libvirtd"], capture_output=True, text=True).stdout.strip()


def _descendants(pid: int) -> set[int]:
    """``pid`` and every process below it, from /proc."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    found = {pid}
    grew = True
    while grew:
        new = {child for child, ppid in parent.items() if ppid in found} - found
        found |= new
        grew = bool(new)
    return found


class DomainWatch(threading.Thread):
    """Polls qemu:///system while the fast tier runs: which new domains appear, and
    whether their owner is the fast tier's process tree (another session may come and
    go on a shared host: its guests are not ours to judge)."""

    def __init__(self, child: subprocess.Popen[str], before: set[str]) -> None:
        super().__init__(daemon=True)
        self.child, self.before = child, before
        self.tree: set[int] = set()
        self.suspects: dict[str, str] = {}

    def run(self) -> None:
        while self.child.poll() is None:
            self.tree |= _descendants(self.child.pid)
            for name, meta in system_domains().items():
                owner = meta.get("owner_pid", "")
                if name not in self.before and (not owner or int(owner) in self.tree):
                    self.suspects[name] = owner or "no owner recorded"
            time.sleep(0.2)


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
    libvirtd, cache = _libvirtd_pid(), _tree(CACHE)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_DEVBOX_HOST_TESTS")}
    child = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-m", "not vm", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    watch = DomainWatch(child, set(system_domains()))
    watch.start()
    out, _ = child.communicate(timeout=900)
    watch.join()
    assert child.returncode == 0, out[-3000:]
    # The other session's guest still runs and answers; libvirtd was never restarted.
    assert debian12.domain.is_running()
    assert debian12.run("echo alive").stdout == "alive\n"
    assert _libvirtd_pid() == libvirtd, "libvirtd was restarted"
    assert not watch.suspects, f"the fast tier started domains in {URI}: {watch.suspects}"
    after = _tree(CACHE)
    changed = {p for p in cache.keys() | after.keys() if cache.get(p) != after.get(p)}
    assert not changed, f"the fast tier changed the default cache: {sorted(changed)}"

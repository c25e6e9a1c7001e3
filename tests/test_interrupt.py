"""Ctrl-C during a build, a boot and a test leaves nothing running and the cache intact.

Each test runs the real thing in a child process group and sends it SIGINT, as a
terminal's Ctrl-C does (VM tier: needs the local debian-12 template).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock
from guest_session import pytest_on_debian12

from pytest_devbox.host.layout import default_cache_dir
from pytest_devbox.virt import domain as dom

pytestmark = pytest.mark.vm

CACHE = default_cache_dir()
URI = "qemu:///system"


def _domains_of(pid: int) -> list[str]:
    conn = dom.connect(URI)
    try:
        return [n for n, m in dom.list_devbox_domains(conn) if m.get("owner_pid") == str(pid)]
    finally:
        conn.close()


def _wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _descendants(pid: int) -> dict[int, tuple[str, str]]:
    """Every live descendant of ``pid``: pid -> (start time, command line)."""
    parent: dict[int, int] = {}
    started: dict[int, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # exited meanwhile
        fields = text[text.rindex(")") + 2 :].split()  # the name may hold spaces
        child = int(stat.parent.name)
        parent[child], started[child] = int(fields[1]), fields[19]
    found: dict[int, tuple[str, str]] = {}
    todo = [pid]
    while todo:
        here = todo.pop()
        for child in [c for c, pp in parent.items() if pp == here]:
            try:
                argv = (Path("/proc") / str(child) / "cmdline").read_bytes()
            except OSError:
                continue
            found[child] = (started[child], argv.replace(b"\0", b" ").decode(errors="replace"))
            todo.append(child)
    return found


def _still_running(procs: dict[int, tuple[str, str]]) -> list[str]:
    """Those of ``procs`` still alive (same pid and start time: not a reused pid)."""
    alive = []
    for pid, (start, argv) in procs.items():
        try:
            text = (Path("/proc") / str(pid) / "stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if fields[19] == start and fields[0] != "Z":
            alive.append(f"{pid} {argv}")
    return alive


def _ctrl_c(proc: subprocess.Popen[str]) -> float:
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return time.monotonic() - t0


def _spawn(code: str, *args: str, log: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, like a job in a terminal
    )


BUILD = """
import sys
from pathlib import Path
from pytest_devbox.config.profiles import Profile
from pytest_devbox.image.cache import ImageCache
cache = ImageCache(Path(sys.argv[1]), public_index=False)
profile = Profile(name="interrupted", template="debian-12", customize=(f"touch /{sys.argv[2]}",))
print("KEY", cache.key_for(profile), flush=True)
cache.image_for(profile)
"""


def test_ctrl_c_during_build_leaves_no_half_image(tmp_path: Path) -> None:
    marker = f"interrupt-{uuid.uuid4().hex[:8]}"  # a recipe never built before
    log = tmp_path / "build.log"
    proc = _spawn(BUILD, str(CACHE), marker, log=log)

    def builder_runs() -> bool:
        return any("virt-builder" in argv for _, argv in _descendants(proc.pid).values())

    _wait_for(builder_runs, 300, "virt-builder to start")
    time.sleep(8)  # well inside virt-builder
    # What could be orphaned, taken while it runs: virt-builder and what it started.
    running = _descendants(proc.pid)
    assert any("virt-builder" in argv for _, argv in running.values()), running
    seconds = _ctrl_c(proc)
    assert proc.returncode != 0
    key = next(ln.split()[1] for ln in log.read_text().splitlines() if ln.startswith("KEY"))
    image = CACHE / "images" / f"interrupted-{key}.qcow2"
    leftovers = sorted(p.name for p in image.parent.glob(f"interrupted-{key}*"))
    assert leftovers in ([], [image.name + ".lock"]), leftovers
    FileLock(str(image) + ".lock").acquire(timeout=1)  # nobody holds the lock any more
    # None of them outlives the interrupted session (a busy host may take a while).
    deadline = time.monotonic() + 60
    while _still_running(running) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _still_running(running), _still_running(running)
    print(f"build interrupted; process gone {seconds:.1f} s after SIGINT")


BOOT = """
import sys
from pathlib import Path
from pytest_devbox.config.profiles import BUILTIN_PROFILES
from pytest_devbox.image.cache import ImageCache
from pytest_devbox.guest.machine import Machine
cache = ImageCache(Path(sys.argv[1]), public_index=False)
Machine.start(BUILTIN_PROFILES["debian-12"], cache=cache, code_dir=Path(sys.argv[2]))
"""


def test_ctrl_c_during_boot_leaves_no_guest(tmp_path: Path) -> None:
    log = tmp_path / "boot.log"
    proc = _spawn(BOOT, str(CACHE), str(tmp_path), log=log)
    _wait_for(lambda: bool(_domains_of(proc.pid)), 600, "the guest to be created")
    (name,) = _domains_of(proc.pid)
    overlays = list((CACHE / "run").glob(f"*/{name}.qcow2"))
    assert overlays, "the overlay should exist while booting"
    seconds = _ctrl_c(proc)
    assert "KeyboardInterrupt" in log.read_text()
    assert not _domains_of(proc.pid)
    assert not any(o.exists() for o in overlays)
    print(f"boot interrupted; guest and overlay gone {seconds:.1f} s after SIGINT")


def test_ctrl_c_during_a_test_leaves_no_guest(tmp_path: Path) -> None:
    started = tmp_path / "started"
    (tmp_path / "test_slow.py").write_text(
        textwrap.dedent(
            f"""
            import pathlib, time
            def test_slow(devbox):
                devbox.run("true")
                pathlib.Path({str(started)!r}).write_text("x")
                time.sleep(300)
            """
        )
    )
    log = tmp_path / "pytest.log"
    proc = subprocess.Popen(
        pytest_on_debian12(str(tmp_path / "test_slow.py")),
        cwd=tmp_path,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    _wait_for(started.exists, 900, "the test to start running in the guest")
    names = _domains_of(proc.pid)
    assert names
    seconds = _ctrl_c(proc)
    out = log.read_text()
    assert proc.returncode == 2, out  # pytest: interrupted
    assert not _domains_of(proc.pid)
    run_dirs = [d for d in (CACHE / "run").glob("*") if any(d.glob(f"{names[0]}*"))]
    assert not run_dirs, run_dirs
    print(f"test interrupted; guest gone {seconds:.1f} s after SIGINT")

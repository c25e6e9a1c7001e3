"""The reaper: what it destroys (test:///default driver) and how its process lives.

That it really destroys a restored guest after kill -9 or Ctrl-C of its owner is shown
on real guests in test_restore.py (VM tier).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from pytest_devbox.guest.reaper import Reaper, reap
from pytest_devbox.virt import domain as dom
from pytest_devbox.virt import domain_xml


@pytest.fixture
def testconn() -> Iterator[libvirt.virConnect]:
    conn = dom.connect("test:///default")
    yield conn
    conn.close()


def _guest(conn: libvirt.virConnect, name: str, owner: str, overlay: Path, keep: str = "0") -> None:
    overlay.write_bytes(b"qcow2")
    spec = domain_xml.DomainSpec(
        name=name,
        disk=overlay,
        code_dir=overlay.parent,
        share="9p",
        accel="tcg",
        console_log=overlay.with_suffix(".log"),
        metadata={"owner": owner, "overlay": str(overlay), "keep": keep},
    )
    dom.Domain.create(conn, spec, autodestroy=False)


def test_reap_destroys_only_what_its_owner_still_runs(
    testconn: libvirt.virConnect, tmp_path: Path
) -> None:
    ours, theirs = "0123456789ab-100-5", "0123456789ab-200-7"
    _guest(testconn, "devbox-a-s0-1", ours, tmp_path / "a.qcow2")
    # The slot's next guest, restored by another process after ours died: not ours.
    _guest(testconn, "devbox-a-s1-1", theirs, tmp_path / "b.qcow2")
    done = reap(testconn, ours, {"devbox-a-s0-1", "devbox-a-s1-1", "devbox-gone"})
    assert done == ["devbox-a-s0-1"]
    assert [n for n, _ in dom.list_devbox_domains(testconn)] == ["devbox-a-s1-1"]
    assert not (tmp_path / "a.qcow2").exists()
    assert (tmp_path / "b.qcow2").exists()


def test_reaper_ignores_ctrl_c_and_exits_when_its_pipe_closes() -> None:
    reaper = Reaper("test:///default")
    try:
        reaper.watch("devbox-nothing-s0-1")
        # Ctrl-C goes to the terminal's foreground group; ours is a session of its own.
        pgid = os.getpgid(reaper._proc.pid)
        assert pgid != os.getpgid(0)
        os.kill(reaper._proc.pid, signal.SIGINT)
        with pytest.raises(subprocess.TimeoutExpired):
            reaper._proc.wait(timeout=1)
        reaper.forget("devbox-nothing-s0-1")
    finally:
        reaper.stop()
    assert reaper._proc.returncode == 0


def test_reaper_outlives_a_killed_parent_and_then_exits(tmp_path: Path) -> None:
    # The parent is SIGKILLed: its end of the pipe closes, the reaper runs and exits.
    code = (
        "import sys, time\n"
        "from pytest_devbox.guest.reaper import Reaper\n"
        "r = Reaper.for_uri('test:///default')\n"
        "r.watch('devbox-x-s0-1')\n"
        "print(r._proc.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    reaper_pid = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    for _ in range(100):
        try:
            os.kill(reaper_pid, 0)
        except ProcessLookupError:
            break
        # Not our child: it is reaped by init once it exits; a zombie counts as gone.
        state = Path(f"/proc/{reaper_pid}/stat").read_text().split()[2]
        if state == "Z":
            break
        subprocess.run(["sleep", "0.1"], check=True)
    else:
        os.kill(reaper_pid, signal.SIGKILL)
        pytest.fail("the reaper did not exit after its parent was killed")


def test_for_uri_reuses_one_reaper_per_process() -> None:
    first = Reaper.for_uri("test:///default")
    try:
        assert Reaper.for_uri("test:///default") is first
    finally:
        first.stop()
    second = Reaper.for_uri("test:///default")
    try:
        assert second is not first
    finally:
        second.stop()

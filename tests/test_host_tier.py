"""scripts/host-test debian-13, interrupted (VM tier): nothing of the root is left.

The script is stopped once a guest boots inside the Debian 13 root (its own libvirtd,
QEMU), by Ctrl-C (SIGINT to its process group) and by kill -9 of the script alone.
Afterwards no process of the root's PID namespace is alive, no mount of the root is
left in ours, the host's libvirtd is the same process as before and lists no guest of
the root.

VM tier, not host_service: it boots a real guest and uses the real cache, but starts a
libvirtd of its own in namespaces of its own; the host's libvirtd is never stopped,
restarted or reconfigured (which the test checks). The first run builds the root
(about 5 minutes, cached under /var/cache/pytest-devbox/host-roots), later ones about a
minute per case.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="builds and enters a root: needs root"),
    # It builds a root from Debian's mirror (minutes, network): in CI, or when asked.
    pytest.mark.skipif(
        os.environ.get("CI") != "true" and os.environ.get("PYTEST_DEVBOX_HOST_TIER") != "1",
        reason="the Debian 13 root tier runs in CI or when asked: PYTEST_DEVBOX_HOST_TIER=1",
    ),
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("mmdebstrap", "unshare", "setpriv", "pivot_root")),
        reason="needs mmdebstrap and util-linux's unshare, setpriv, pivot_root",
    ),
]

HOST_TEST = Path(__file__).resolve().parents[1] / "scripts" / "host-test"
ROOTS = Path("/var/cache/pytest-devbox/host-roots")
OUR_PIDNS = os.readlink("/proc/self/ns/pid")


def _ppid(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _descendants(root: int) -> list[int]:
    found, pids = [], _pids()
    for pid in pids:
        p = pid
        while p > 1:
            p = _ppid(p)
            if p == root:
                found.append(pid)
                break
    return found


def _pidns(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return ""


def _mntns(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return ""


def _libvirtd_pid() -> int:
    """The host's libvirtd: the one in our PID namespace."""
    for pid in _pids():
        if _comm(pid) == "libvirtd" and _pidns(pid) == OUR_PIDNS:
            return pid
    return 0


def _host_domains() -> set[str]:
    out = subprocess.run(
        ["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    return {line.strip() for line in out.splitlines() if line.strip()}


def _root_mounts() -> list[str]:
    mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    return [line for line in mounts if str(ROOTS) in line]


@pytest.mark.parametrize("how", ["ctrl-c", "kill-9"])
def test_an_interrupted_host_tier_leaves_nothing(tmp_path: Path, how: str) -> None:
    libvirtd = _libvirtd_pid()
    assert libvirtd, "the host's libvirtd is not running"
    env = {**os.environ, "HOST_TEST_STEPS": "vm", "HOST_TEST_K": "test_share_both_ways"}
    log = (tmp_path / "host-test.log").open("w")
    script = subprocess.Popen(
        [str(HOST_TEST), "debian-13"], stdout=log, stderr=subprocess.STDOUT, env=env,
        start_new_session=True,
    )  # fmt: skip
    try:
        # Until a guest runs inside: QEMU and libvirtd in another PID namespace, below us.
        deadline = time.monotonic() + 900  # a cold cache builds the root first
        qemu = 0
        while not qemu and time.monotonic() < deadline:
            assert script.poll() is None, (tmp_path / "host-test.log").read_text()
            inside = [p for p in _descendants(script.pid) if _pidns(p) != OUR_PIDNS]
            names = {p: _comm(p) for p in inside}
            if "libvirtd" in names.values():
                qemu = next((p for p, n in names.items() if n.startswith("qemu-system")), 0)
            time.sleep(1)
        assert qemu, "no guest started in the root:\n" + (tmp_path / "host-test.log").read_text()
        pidns, mntns = _pidns(qemu), os.readlink(f"/proc/{qemu}/ns/mnt")
        cmdline = Path(f"/proc/{qemu}/cmdline").read_bytes().decode().split("\0")
        guest = re.sub(r"^guest=([^,]+).*", r"\1", cmdline[cmdline.index("-name") + 1])
        # The root's mounts are in its namespace only, never in ours.
        assert " /src " in Path(f"/proc/{qemu}/mountinfo").read_text()
        assert _root_mounts() == []
    finally:
        if how == "ctrl-c":
            os.killpg(script.pid, signal.SIGINT)
        else:
            os.kill(script.pid, signal.SIGKILL)
        script.wait(timeout=60)
        log.close()

    # The kernel kills the namespace's processes after its init: give it a moment.
    deadline = time.monotonic() + 20
    while (left := [p for p in _pids() if _pidns(p) == pidns]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == [], f"processes of the root still alive: {[_comm(p) for p in left]}"
    # Nothing holds its mount namespace any more, so the kernel dropped its mounts.
    assert [p for p in _pids() if _mntns(p) == mntns] == []
    assert _root_mounts() == []
    assert _libvirtd_pid() == libvirtd, "the host's libvirtd was restarted"
    assert guest.startswith("devbox-")
    assert guest not in _host_domains()

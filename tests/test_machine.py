"""The machine layer on real guests from the local Debian templates (VM tier).

Needs `devbox template build debian-11 debian-12` first (scripts/test does it).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from guests import CACHE, GUEST_GID, GUEST_UID, URI, start_machine

from pytest_devbox.config.profiles import BUILTIN_PROFILES
from pytest_devbox.errors import BootTimeout, CommandFailed, CommandTimeout
from pytest_devbox.guest.machine import Machine
from pytest_devbox.guest.sweep import sweep_leftovers
from pytest_devbox.host.probes import resolve_accel
from pytest_devbox.image.cache import ImageCache
from pytest_devbox.virt import domain as dom

# Shared guests (debian12, a virtiofs profile, and debian11_9p: both 9p, mapped, by
# default: config/code_ids.py) are fixtures of conftest.py.
pytestmark = pytest.mark.vm


@pytest.mark.parametrize(
    "machine_name, fstype",
    [("debian12", "9p"), pytest.param("debian11_9p", "9p", marks=pytest.mark.host_tier)],
)
def test_share_both_ways(
    request: pytest.FixtureRequest, code_dir: Path, machine_name: str, fstype: str
) -> None:
    m: Machine = request.getfixturevalue(machine_name)
    print(f"{m.distro}: uname -r = {m.run('uname -r').stdout.strip()}")
    assert m.run("findmnt -no FSTYPE /code").stdout.strip() == fstype
    assert m.run("cat /code/from-host.txt").stdout == "written on the host\n"

    # By default as the guest user devbox, who has the host user's uid and gid.
    m.run(f"echo from {m.distro} > /code/by-devbox-{m.distro}")
    written = code_dir / f"by-devbox-{m.distro}"
    assert written.read_text() == f"from {m.distro}\n"
    # 9p mapped: the guest sees its owner (kept in xattrs); the host file is QEMU's
    # user's, which is ours (qemu_user.py "caller").
    seen = m.run(f"stat -c '%u %g' /code/by-devbox-{m.distro}").stdout.split()
    assert seen == [str(GUEST_UID), str(GUEST_GID)]
    assert (written.stat().st_uid, written.stat().st_gid) == (os.getuid(), os.getgid())
    assert m.run("id -u").stdout.strip() == str(GUEST_UID)
    assert m.run("id -u", user="root").stdout.strip() == "0"


def test_second_start_is_a_cache_hit(debian12: Machine, cache: ImageCache, code_dir: Path) -> None:
    t0 = time.monotonic()
    with start_machine(BUILTIN_PROFILES["debian-12"], cache, code_dir) as second:
        assert not second.image.built
        assert second.image.path == debian12.image.path
        assert second.image.metadata["key"] == debian12.image.key
        # Each guest runs on its own overlay: what one writes outside /code the other never sees.
        second.run("echo only-here > /root/marker", user="root")
        assert debian12.run("test -e /root/marker", check=False, user="root").exit_status == 1
        print(
            f"second start (cache hit) ready in {time.monotonic() - t0:.1f} s, "
            f"boot {second.boot_seconds:.1f} s"
        )
    assert not second.overlay.exists()


def test_large_output_and_exit_status(debian12: Machine) -> None:
    cmd = "head -c 10485760 /dev/zero | tr '\\0' x; echo oops >&2; exit 3"
    with pytest.raises(CommandFailed) as info:
        debian12.run(cmd)
    result = info.value.result
    assert result.exit_status == 3
    assert len(result.stdout) == 10 * 1024 * 1024
    assert result.stderr == "oops\n"
    assert "status 3" in str(info.value) and "oops" in str(info.value)


def test_timeout_stops_the_command(debian12: Machine) -> None:
    t0 = time.monotonic()
    with pytest.raises(CommandTimeout):
        debian12.run("sleep 100", timeout=2)
    assert time.monotonic() - t0 < 60  # stopped at the timeout, not after the 100 s
    assert debian12.run("pgrep -x sleep", check=False).exit_status == 1
    assert debian12.run("echo still here").stdout == "still here\n"


def test_put_and_get(debian12: Machine, tmp_path: Path) -> None:
    payload = os.urandom(300_000)
    (tmp_path / "in.bin").write_bytes(payload)
    debian12.put(tmp_path / "in.bin", "/tmp/in.bin")
    debian12.run("cp /tmp/in.bin /tmp/out.bin")
    debian12.get("/tmp/out.bin", tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == payload


def test_ssh_command_works_with_openssh(debian12: Machine) -> None:
    argv = [*shlex.split(debian12.ssh_command()), "-o", "BatchMode=yes", "cat /etc/debian_version"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.startswith("12.")


def test_boot_timeout_names_phase_and_shows_console(cache: ImageCache, code_dir: Path) -> None:
    before = _our_domains()
    t0 = time.monotonic()
    with pytest.raises(BootTimeout) as info:
        Machine.start(
            BUILTIN_PROFILES["debian-12"], cache=cache, code_dir=code_dir, uri=URI, boot_timeout=2
        )
    assert time.monotonic() - t0 < 60
    assert info.value.phase == "ssh banner"
    assert info.value.console_tail.strip(), "the console tail should show how far the boot got"
    assert _our_domains() == before  # the timed-out guest was destroyed


def _our_domains() -> set[str]:
    conn = dom.connect(URI)
    try:
        mine = str(os.getpid())
        return {n for n, meta in dom.list_devbox_domains(conn) if meta.get("owner_pid") == mine}
    finally:
        conn.close()


HOLDER = """
import sys, time
from pathlib import Path
from pytest_devbox.config.profiles import BUILTIN_PROFILES
from pytest_devbox.image.cache import ImageCache
from pytest_devbox.guest.machine import Machine
cache = ImageCache(Path(sys.argv[1]), public_index=False, tcg=sys.argv[2] == "tcg",
                   guest_user=("devbox", int(sys.argv[3]), int(sys.argv[3])))
m = Machine.start(BUILTIN_PROFILES["debian-12"], cache=cache, code_dir=Path(sys.argv[4]),
                  log=lambda line: print(line, file=sys.stderr))
print(m.name, m.overlay, flush=True)
time.sleep(600)
"""


def test_kill_9_leaves_no_guest(code_dir: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(CACHE), resolve_accel(), str(GUEST_UID), str(code_dir)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        name, overlay = proc.stdout.readline().split()
        conn = dom.connect(URI)
        try:
            assert name in [n for n, _ in dom.list_devbox_domains(conn)]
            proc.kill()
            proc.wait()
            deadline = time.monotonic() + 30
            while name in [n for n, _ in dom.list_devbox_domains(conn)]:
                assert time.monotonic() < deadline, f"{name} still exists 30 s after kill -9"
                time.sleep(0.5)
        finally:
            conn.close()
        # libvirtd destroyed the guest; the overlay is swept by the next session.
        assert Path(overlay).exists()
        swept = sweep_leftovers(URI, CACHE)
        assert not Path(overlay).exists(), swept
    finally:
        proc.kill()

"""Guests on a "remote" libvirt host, VM tier (issue 13).

The remote host is a private sshd on loopback in front of this host's libvirtd
(remote_host.py).

One guest is booted in this process and shared; the examples run and the kill -9 run
are separate pytest processes (the second one is killed as soon as its domain exists).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from guests import CACHE
from remote_host import LOCAL_URI, RemoteHost, pool_volumes, remote_host

from pytest_devbox.config.profiles import load_profiles
from pytest_devbox.errors import BootTimeout
from pytest_devbox.guest.machine import Machine
from pytest_devbox.guest.sweep import sweep_leftovers
from pytest_devbox.host.probes import resolve_accel
from pytest_devbox.image.cache import ImageCache
from pytest_devbox.virt import domain as dom
from pytest_devbox.virt import volumes

pytestmark = pytest.mark.vm
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteHost]:
    with remote_host(tmp_path_factory.mktemp("remote-host")) as host:
        yield host


@pytest.fixture(scope="module")
def code(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("code")
    (d / "from-host.txt").write_text("written on the host\n")
    return d


@pytest.fixture(scope="module")
def guest_log() -> list[str]:
    return []


@pytest.fixture(scope="module")
def guest(remote: RemoteHost, code: Path, guest_log: list[str]) -> Iterator[Machine]:
    """The examples' debian-12 with the plugin's cache settings: the pytest sessions
    below use the same image, so this first session is the only one that uploads it."""

    def log(line: str) -> None:
        guest_log.append(line)
        print(line)

    cache = ImageCache(CACHE, public_index=False, tcg=resolve_accel() == "tcg", log=log)
    with Machine.start(
        load_profiles(EXAMPLES)["debian-12"],
        cache=cache,
        code_dir=code,
        uri=remote.uri,
        remote_pool=remote.pool_dir,
        log=log,
    ) as m:
        yield m


def test_a_remote_guest_runs_commands_copies_files_and_has_code(
    guest: Machine, guest_log: list[str], tmp_path: Path
) -> None:
    assert guest.run("cat /code/from-host.txt").stdout == "written on the host\n"
    assert not guest.run("mountpoint -q /code", check=False).ok  # a copy, not a mount
    assert any("copied into the guest" in line for line in guest_log), guest_log
    src = tmp_path / "in.txt"
    src.write_text("to the guest\n")
    guest.put(src, "/tmp/in.txt")
    assert guest.run("cat /tmp/in.txt").stdout == "to the guest\n"
    guest.get("/tmp/in.txt", tmp_path / "back.txt")
    assert (tmp_path / "back.txt").read_text() == "to the guest\n"
    assert guest.run("id -un", user="root").stdout == "root\n"


def test_its_disk_and_console_are_volumes_of_our_pool(guest: Machine, remote: RemoteHost) -> None:
    assert str(guest.overlay).startswith(remote.pool_dir + "/")
    names = pool_volumes(remote.pool_dir)
    assert guest.overlay.name in names and guest.console_log.name in names
    assert "Linux" in guest.console_tail(400) or "login" in guest.console_tail(400)


def test_the_image_is_uploaded_once(
    guest: Machine, remote: RemoteHost, guest_log: list[str]
) -> None:
    uploads = [line for line in guest_log if line.startswith("uploaded ")]
    assert len(uploads) == 1, guest_log
    images = [n for n in pool_volumes(remote.pool_dir) if not n.startswith("devbox-")]
    assert len(images) == 2 and images[1] == images[0] + volumes.MARKER, images
    # A second start finds it complete: nothing more is uploaded.
    again: list[str] = []
    conn = dom.connect(remote.uri)
    try:
        pool = volumes.ensure_pool(conn, remote.pool_dir)
        upload = volumes.Upload(guest.image.path, images[0], 1, Path("/nonexistent/lock"))
        vol = volumes.upload_image(conn, pool, upload, again.append)
        assert vol.name() == images[0] and again == []
    finally:
        conn.close()


def test_a_remote_boot_that_times_out_shows_its_console_and_leaves_nothing(
    guest: Machine, remote: RemoteHost, code: Path
) -> None:
    """The console file is on the remote host: its tail comes back through libvirt."""
    cache = ImageCache(CACHE, public_index=False, tcg=resolve_accel() == "tcg")
    before = pool_volumes(remote.pool_dir)
    with pytest.raises(BootTimeout) as info:
        Machine.start(
            load_profiles(EXAMPLES)["debian-12"],
            cache=cache,
            code_dir=code,
            uri=remote.uri,
            remote_pool=remote.pool_dir,
            boot_timeout=8,
            log=lambda _line: None,
        )
    assert info.value.console_tail.strip(), "the console tail should show how far it got"
    assert pool_volumes(remote.pool_dir) == before  # its overlay and console are gone


def test_the_ssh_line_works_from_a_shell(guest: Machine) -> None:
    argv = guest.ssh_argv()
    assert any(a.startswith("ProxyCommand=") for a in argv)
    hop = subprocess.run(
        [*argv, "-o", "BatchMode=yes", "hostname"], capture_output=True, text=True, timeout=60
    )
    assert hop.returncode == 0 and hop.stdout.strip() == "devbox-debian-12", hop.stderr


def _pytest(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        f"--devbox-cache={CACHE}",
        *args,
    ]


def test_pytest_examples_through_the_remote_uri(remote: RemoteHost, guest: Machine) -> None:
    argv = _pytest(
        str(EXAMPLES),
        "--devbox=debian-12",
        f"--devbox-uri={remote.uri}",
        f"--devbox-remote-pool={remote.pool_dir}",
    )
    r = subprocess.run(argv, cwd=EXAMPLES, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "copied into the guest" in r.stdout and " passed" in r.stdout
    assert "uploaded " not in r.stdout  # a second session: the image is there already


def _domains_of(pid: int) -> list[str]:
    conn = dom.connect(LOCAL_URI)
    try:
        return [n for n, m in dom.list_devbox_domains(conn) if m.get("owner_pid") == str(pid)]
    finally:
        conn.close()


def _wait(cond: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_kill_9_leaves_no_remote_domain_and_the_sweep_removes_its_volumes(
    remote: RemoteHost, guest: Machine, tmp_path: Path
) -> None:
    """A third session of the examples' debian-12: its image is in the pool already."""
    (tmp_path / "pyproject.toml").write_text((EXAMPLES / "pyproject.toml").read_text())
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_hold.py").write_text(
        textwrap.dedent(
            """
            import time

            def test_hold(devbox):
                time.sleep(600)
            """
        )
    )
    out = tmp_path / "out.txt"
    proc = subprocess.Popen(
        _pytest(
            "-s",
            "--devbox=debian-12",
            f"--devbox-uri={remote.uri}",
            f"--devbox-remote-pool={remote.pool_dir}",
        ),
        cwd=tmp_path,
        stdout=out.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        _wait(lambda: _domains_of(proc.pid) or proc.poll() is not None, 600, "its domain")
        assert proc.poll() is None, out.read_text()
        os.kill(proc.pid, signal.SIGKILL)  # the pytest process only: its ssh child is orphaned
        proc.wait(10)
        _wait(lambda: not _domains_of(proc.pid), 60, "AUTODESTROY over qemu+ssh")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "uploaded " not in out.read_text(), out.read_text()  # a second session: no upload
    mine = [n for n in pool_volumes(remote.pool_dir) if _owned_by(n, proc.pid)]
    assert mine, pool_volumes(remote.pool_dir)  # its overlay (and console) are left
    lines = sweep_leftovers(remote.uri, CACHE, remote_pool=remote.pool_dir)
    assert sum("removed leftover volume" in line for line in lines) == len(mine), lines
    assert not [n for n in pool_volumes(remote.pool_dir) if _owned_by(n, proc.pid)]


def test_doctor_checks_the_remote_host(remote: RemoteHost) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest_devbox.cli",
            "doctor",
            "--uri",
            remote.uri,
            "--remote-pool",
            remote.pool_dir,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    checks = {c["name"]: c for c in json.loads(r.stdout)}
    assert checks["ssh tunnel"]["ok"], checks
    assert checks["remote pool"]["ok"] and "GiB free" in checks["remote pool"]["detail"]
    assert "remote accel" in checks


def _owned_by(volume: str, pid: int) -> bool:
    """A guest volume `<domain>@<host>@<scope>-<pid>-<start>.<kind>` of process `pid`."""
    if volume.count("@") != 2:
        return False
    owner = volume.rsplit("@", 1)[1].rsplit(".", 1)[0]
    return owner.split("-")[1:2] == [str(pid)]

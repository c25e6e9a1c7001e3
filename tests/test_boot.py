"""Readiness phases against libvirt's test driver (a real running domain, no QEMU) and
real sockets: every expiry is a BootTimeout naming its phase, a dead guest fails at once."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# The real local sshd of test_ssh.py stands in for a guest (fixtures shared by import).
from test_ssh import (  # noqa: F401
    authorized_keys,
    client_key,
    keydir,
    session_conn,
    sshd,
)

from pytest_devbox.errors import BootTimeout, GuestDied, HostKeyMismatch, SSHError
from pytest_devbox.guest import readiness
from pytest_devbox.guest.plan import tail_file
from pytest_devbox.guest.readiness import (
    SHARE_PROBE,
    Boot,
    Deadline,
    authenticate,
    mount_code,
    wait_banner,
)
from pytest_devbox.transport.keys import ensure_keypair
from pytest_devbox.transport.ssh import Connection
from pytest_devbox.virt import domain as dom

TEST_DOMAIN = """<domain type='test'><name>{name}</name><memory>65536</memory>
<os><type>hvm</type></os></domain>"""


@pytest.fixture
def test_domain() -> Iterator[dom.Domain]:
    conn = dom.connect("test:///default")
    virdom = conn.createXML(TEST_DOMAIN.format(name=f"devbox-boot-{uuid.uuid4().hex[:6]}"), 0)
    try:
        yield dom.Domain(virdom)
    finally:
        dom.Domain(virdom).destroy()
        conn.close()


def _boot(domain: dom.Domain, tmp_path: Path, seconds: float) -> Boot:
    console = tmp_path / "console.log"
    console.write_text("[  OK  ] Reached target Multi-User System.\nlast console line\n")
    return Boot(domain, "debian-12", console, Deadline(seconds), tail_file)


def _closed_port() -> int:
    # Bound but never listening: connecting is refused at once, like a guest whose
    # sshd never comes up.
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


def test_deadline_caps_waits() -> None:
    d = Deadline(100.0)
    assert 99.0 < d.cap(500.0) <= 100.0
    assert d.cap(2.0) == 2.0
    assert not d.expired()
    gone = Deadline(0.0)
    assert gone.expired()
    assert gone.cap(30.0) == 1.0  # a floor, so a last try still gets a real timeout


def test_auth_that_never_succeeds_is_a_boot_timeout_with_the_console(
    test_domain: dom.Domain, tmp_path: Path
) -> None:
    # Defect: the deadline passing during auth used to raise the raw SSHError (no
    # phase, no console tail, not retried by the pool).
    ssh = Connection(
        "127.0.0.1",
        _closed_port(),
        key_path=ensure_keypair(tmp_path / "ssh"),
        known_hosts=tmp_path / "ssh" / "known_hosts",
        host_key_alias="img",
    )
    with pytest.raises(BootTimeout) as info:
        authenticate(_boot(test_domain, tmp_path, 2.0), ssh)
    assert info.value.phase == "auth"
    assert "last console line" in str(info.value)
    assert "SSHError" in str(info.value)  # what was last seen


def test_banner_that_never_comes_is_a_boot_timeout(test_domain: dom.Domain, tmp_path: Path) -> None:
    with pytest.raises(BootTimeout) as info:
        wait_banner(_boot(test_domain, tmp_path, 1.5), _closed_port())
    assert info.value.phase == "ssh banner"


def test_a_guest_that_stops_fails_at_once_not_at_the_deadline(
    test_domain: dom.Domain, tmp_path: Path
) -> None:
    boot = _boot(test_domain, tmp_path, 600.0)
    test_domain.destroy()
    start = time.monotonic()
    with pytest.raises(GuestDied) as info:
        wait_banner(boot, _closed_port())
    assert time.monotonic() - start < 60  # not the 600 s deadline
    assert info.value.phase == "ssh banner"
    assert "last console line" in str(info.value)


def test_a_changed_host_key_is_final_not_retried(test_domain: dom.Domain, tmp_path: Path) -> None:
    calls = []

    def attempt() -> bool:
        calls.append(1)
        raise HostKeyMismatch("changed")

    boot = _boot(test_domain, tmp_path, 30.0)
    with pytest.raises(HostKeyMismatch):
        boot.poll("auth", attempt, interval=0.1, transient=(SSHError,), final=(HostKeyMismatch,))
    assert calls == [1]


def _host_offers(fs: str, module: str) -> bool:
    probe = SHARE_PROBE.format(fs=fs, module=module)
    return subprocess.run(["sh", "-c", probe], capture_output=True).returncode == 0


@pytest.mark.skipif(os.path.exists("/code"), reason="this host has a /code of its own")
@pytest.mark.skipif(os.geteuid() != 0, reason="logs in as root, as the guest connection does")
@pytest.mark.parametrize(("share", "module"), [("9p", "9pnet_virtio"), ("virtiofs", "virtiofs")])
def test_code_not_mounted_names_the_share_the_kernel_offer_and_the_field(
    test_domain: dom.Domain,
    tmp_path: Path,
    session_conn: Connection,  # noqa: F811 (the fixture imported above)
    share: str,
    module: str,
) -> None:
    # The local sshd plays a guest whose /code never mounts (there is no /code here);
    # its kernel is this host's, so what it offers is what the probe finds here.
    with pytest.raises(BootTimeout) as info:
        mount_code(_boot(test_domain, tmp_path, 3.0), session_conn, share)
    message = str(info.value)
    assert info.value.phase == "/code mounted"
    assert "debian-12: /code is not mounted in the guest" in message
    assert f"The profile shares /code with {share}" in message
    offers = "offers" if _host_offers(share, module) else "does not offer"
    assert f"the guest kernel {offers} {share} (/proc/filesystems or its module)" in message
    assert "Change the profile's `share` field" in message
    assert "last console line" in message


def test_a_hanging_mount_probe_ends_at_the_boot_deadline(
    test_domain: dom.Domain,
    tmp_path: Path,
    session_conn: Connection,  # noqa: F811 (the fixture imported above)
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Defect: the probe had its own 30 s timeout, past the boot's deadline, and its
    # CommandTimeout escaped unretried. A guest whose mount hangs: the real sshd runs it.
    monkeypatch.setattr(readiness, "MOUNT_CODE", "sleep 120")
    t0 = time.monotonic()
    with pytest.raises(BootTimeout) as info:
        mount_code(_boot(test_domain, tmp_path, 3.0), session_conn, "virtiofs")
    assert info.value.phase == "/code mounted"
    assert time.monotonic() - t0 < 25  # the deadline (3 s), not the probe's own 30 s

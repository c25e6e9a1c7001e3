"""The xdist broker and the pool's end (findings 5, 7 and 30 of the 2026-12 review):
real Unix sockets and handler threads; a Machine on a libvirt test-driver domain."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from test_domain import spec_for

from pytest_devbox.config.profiles import BUILTIN_PROFILES
from pytest_devbox.config.settings import Settings
from pytest_devbox.errors import DevboxError
from pytest_devbox.guest.machine import Machine
from pytest_devbox.guest.parts import GuestParts
from pytest_devbox.guest.sites import Link, LocalFiles
from pytest_devbox.image.cache import ImageInfo
from pytest_devbox.plugin.broker import Broker, ask, tell_done
from pytest_devbox.pool.pool import Pool
from pytest_devbox.virt import domain as dom

URI = "test:///default"
DEBIAN_12 = BUILTIN_PROFILES["debian-12"]
IMAGE = ImageInfo(Path("/c/images/debian-12-0123.qcow2"), "0123", False, None, {"built_at": "x"})


def test_finding7_any_exception_of_a_start_is_answered_and_remembered() -> None:
    """Before: a PermissionError (or OSError, libvirtError) escaped the handler, each
    worker saw "closed the connection without an answer" and booted the distro again."""
    asked: list[str] = []

    def start(distro: str) -> dict[str, object]:
        asked.append(distro)
        raise PermissionError(13, "Permission denied", "/cache/run/r1/o.qcow2")

    broker = Broker(start)
    try:
        for worker in ("gw0", "gw1"):
            with pytest.raises(DevboxError) as caught:
                ask(str(broker.path), "debian-12", worker)
            assert "PermissionError" in str(caught.value)
            assert "Permission denied" in str(caught.value)
        assert asked == ["debian-12"]  # remembered: not started again
    finally:
        broker.close()


def test_finding5_the_last_worker_done_with_a_distro_releases_its_guest() -> None:
    """Before: the controller kept every shared guest to the end of the session, so
    more distros than fit in memory hung it. Now the guest goes once no worker that
    asked for it needs it any more; a later ask starts it again."""
    started: list[str] = []
    released: list[str] = []

    def start(distro: str) -> dict[str, object]:
        started.append(distro)
        return {"name": f"devbox-{distro}-x"}

    broker = Broker(start, released.append)
    path = str(broker.path)
    try:
        ask(path, "debian-12", "gw0")
        ask(path, "debian-12", "gw1")
        tell_done(path, "debian-12", "gw0")
        assert released == []  # gw1 still uses it
        tell_done(path, "debian-12", "gw0")  # twice: no effect
        assert released == []
        tell_done(path, "debian-12", "gw1")
        assert released == ["debian-12"]
        tell_done(path, "centos-7", "gw1")  # never asked for: nothing to release
        assert released == ["debian-12"]
        ask(path, "debian-12", "gw0")  # counted again: its next release needs gw0's done
        tell_done(path, "debian-12", "gw0")
        assert released == ["debian-12", "debian-12"]
    finally:
        broker.close()


def test_finding30_a_closed_broker_starts_nothing_more() -> None:
    started: list[str] = []
    broker = Broker(lambda d: started.append(d) or {})
    broker.close()
    assert broker.answer("debian-12", "gw0") == {
        "error": "the pytest-xdist controller is ending its session"
    }
    assert started == []


@pytest.fixture
def virt() -> Iterator[libvirt.virConnect]:
    """Held for the test: the test driver forgets its domains with its last connection."""
    conn = dom.connect(URI)
    yield conn
    conn.close()


class LateBootPool(Pool):
    """A Pool whose boot ends only when the test says so, on a test-driver domain (the
    fast tier boots no QEMU): what a broker handler thread mid-boot sees at close()."""

    def __init__(self, settings: Settings, virt: libvirt.virConnect) -> None:
        super().__init__([DEBIAN_12], settings, log=lambda _: None)
        self.virt = virt
        self.booting = threading.Event()
        self.finish = threading.Event()
        self.domains: list[dom.Domain] = []

    def _start(self, distro: str) -> Machine:
        self.booting.set()
        self.finish.wait(10)
        spec = spec_for("9p", "tcg", name=f"devbox-debian-12-{uuid.uuid4().hex[:8]}")
        domain = dom.Domain.create(self.virt, spec, autodestroy=False)
        self.domains.append(domain)
        cache = self.settings.cache_dir
        parts = GuestParts(
            profile=DEBIAN_12, image=IMAGE, virconn=dom.connect(URI), domain=domain,
            ssh=Link(URI).connection(cache, 41022, "devbox-alias"),
            files=LocalFiles(cache / "o.qcow2", cache / "o.console"),
            share="sync", code_dir=self.settings.code_dir,
        )  # fmt: skip
        return Machine(parts)


@pytest.mark.parametrize("keep", [False, True])
def test_finding30_a_boot_that_ends_after_close_leaves_no_guest(
    virt: libvirt.virConnect, tmp_path: Path, keep: bool
) -> None:
    """Before: the machine joined the closed pool and stayed up (with keep: no kept
    line, no reaper, counted against every later admission)."""
    settings = Settings(uri=URI, cache_dir=tmp_path, code_dir=tmp_path, keep=keep)
    pool = LateBootPool(settings, virt)
    outcome: list[object] = []

    def worker_asks() -> None:
        try:
            outcome.append(pool.get("debian-12"))
        except DevboxError as e:
            outcome.append(e)

    handler = threading.Thread(target=worker_asks)
    handler.start()
    assert pool.booting.wait(10)
    assert pool.close() == []  # nothing up yet: nothing to keep or report
    pool.finish.set()
    handler.join(10)
    (error,) = outcome
    assert isinstance(error, DevboxError), error
    assert "the session ended while devbox-debian-12-" in str(error)
    assert not pool.domains[0].is_running()

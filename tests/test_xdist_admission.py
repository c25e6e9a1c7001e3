"""The xdist controller's shared guests and memory (finding 5 of the 2026-12 review):
its own guests leave no room for the next distro's, so it waits (at most a boot
deadline) for a worker to let one go, instead of failing or hanging. On libvirt's test
driver: real domains with this process's metadata and memory, a real Pool and cache."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from seeded_cache import TEST_URI, seed_cache
from test_domain import spec_for

from pytest_devbox.config.profiles import BUILTIN_PROFILES
from pytest_devbox.config.settings import Settings
from pytest_devbox.errors import DomainError
from pytest_devbox.host import owner
from pytest_devbox.plugin.session import DevboxSession
from pytest_devbox.virt import admission
from pytest_devbox.virt import domain as dom

DEBIAN_12 = BUILTIN_PROFILES["debian-12"]


@pytest.fixture
def conn() -> Iterator[libvirt.virConnect]:
    c = dom.connect(TEST_URI)
    yield c
    c.close()


def _session(tmp_path: Path) -> DevboxSession:
    seed_cache(tmp_path / "cache")
    settings = Settings(
        uri=TEST_URI, cache_dir=tmp_path / "cache", code_dir=tmp_path, accel="tcg",
        offline=True, restore="off", boot_timeout=3.0,
    )  # fmt: skip
    profiles = {"debian-12": DEBIAN_12}
    return DevboxSession(settings, profiles, [DEBIAN_12], accel="tcg", log=lambda _: None)


def _own_guest_filling_the_host(conn: libvirt.virConnect) -> dom.Domain:
    """A guest of this process as big as this host's whole budget for guests."""
    mib = admission.budget_mib(admission.meminfo_mib()["MemTotal"])
    meta = {
        "owner_pid": str(os.getpid()),
        "owner_host": socket.gethostname(),
        "owner": owner.me().token,
    }
    name = f"devbox-big-{uuid.uuid4().hex[:8]}"
    spec = spec_for("9p", "tcg", name=name, memory_mib=mib, metadata=meta)
    return dom.Domain.create(conn, spec, autodestroy=False)


def test_finding5_the_controller_waits_for_a_worker_to_let_a_guest_go(
    conn: libvirt.virConnect, tmp_path: Path
) -> None:
    state = _session(tmp_path)
    big = _own_guest_filling_the_host(conn)
    outcome: list[BaseException] = []

    def handler() -> None:
        try:
            state._shared_when_room(state.pool, "debian-12")
        except BaseException as e:
            outcome.append(e)

    thread = threading.Thread(target=handler)
    try:
        thread.start()
        time.sleep(0.5)
        assert thread.is_alive()  # waiting, not failed at once
        big.destroy()  # the distro a worker let go of
        state._release_shared("debian-11")
        thread.join(10)
    finally:
        big.destroy()
        state.close()
    # Admitted once the guest went: then the test driver refuses AUTODESTROY.
    (error,) = outcome
    assert isinstance(error, DomainError) and "could not start" in str(error), error


def test_finding5_without_a_release_the_controller_gives_up_at_the_deadline(
    conn: libvirt.virConnect, tmp_path: Path
) -> None:
    state = _session(tmp_path)
    big = _own_guest_filling_the_host(conn)
    t0 = time.monotonic()
    try:
        with pytest.raises(admission.NoMemory, match=f"{big.name}"):
            state._shared_when_room(state.pool, "debian-12")
    finally:
        big.destroy()
        state.close()
    assert 2.5 < time.monotonic() - t0 < 8

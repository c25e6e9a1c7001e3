"""Guests start only as memory allows: counted on libvirt's test driver (real domains of
a real libvirt API, in-process), against a host size the test chooses."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

from test_domain import spec_for

from pytest_devbox.virt import admission
from pytest_devbox.virt import domain as dom

URI = "test:///default"


def _guest(conn: object, mib: int) -> dom.Domain:
    name = f"devbox-mem-{uuid.uuid4().hex[:8]}"
    return dom.Domain.create(
        conn, spec_for("9p", "tcg", name=name, memory_mib=mib), autodestroy=False
    )  # type: ignore[arg-type]


def test_meminfo_reads_this_host() -> None:
    info = admission.meminfo_mib()
    assert 0 < info["MemAvailable"] <= info["MemTotal"]


def test_budget_keeps_a_reserve() -> None:
    assert admission.budget_mib(24 * 1024) == 24 * 1024 - int(24 * 1024 * 0.15)
    assert admission.budget_mib(4096) == 3072  # at least 1 GiB stays with the host


def test_a_guest_that_does_not_fit_waits_for_one_to_stop(tmp_path: Path) -> None:
    conn = dom.connect(URI)
    first = _guest(conn, 1024)
    lines: list[str] = []
    # Room for one 1 GiB guest and its overhead, not two.
    total = admission.RESERVE_MIN_MIB + 2 * (1024 + admission.OVERHEAD_MIB) - 1
    stopper = threading.Timer(1.0, first.destroy)
    try:
        assert admission.guests_mib(conn) == 1024 + admission.OVERHEAD_MIB
        stopper.start()
        t0 = time.monotonic()
        with admission.admitted(
            conn,
            1024,
            tmp_path / "memory.lock",
            label="debian-12",
            log=lines.append,
            timeout=30.0,
            total_mib=total,
        ):
            waited = time.monotonic() - t0
            assert not first.is_running()  # admitted only once the first one stopped
    finally:
        stopper.cancel()
        first.destroy()
        conn.close()
    assert waited >= 0.9
    assert len(lines) == 1 and "it starts when one stops" in lines[0], lines


def test_a_guest_that_fits_starts_at_once(tmp_path: Path) -> None:
    conn = dom.connect(URI)
    first = _guest(conn, 512)
    lines: list[str] = []
    try:
        with admission.admitted(
            conn,
            512,
            tmp_path / "memory.lock",
            label="d",
            log=lines.append,
            timeout=0,
            total_mib=64 * 1024,
        ):
            pass
    finally:
        first.destroy()
        conn.close()
    assert lines == []

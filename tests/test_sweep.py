"""Sweeping what dead sessions left, on libvirt's test driver: the same API and domain
XML as qemu:///system, without touching the host's libvirtd or anyone's guests."""

from __future__ import annotations

import os
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_devbox.guest.sweep import claim_run_dir, read_owner, sweep_leftovers
from pytest_devbox.host import owner
from pytest_devbox.virt import domain as dom
from pytest_devbox.virt import domain_xml

URI = "test:///default"


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid  # reaped: nothing runs under this pid any more


def token_of(pid: int) -> str:
    """The owner token a process of ours with `pid` has (or had)."""
    return owner.Owner(owner.scope(), pid, owner.start_time(pid) or 0).token


def _leftover(tmp_path: Path, owner_pid: int, keep: bool) -> tuple[dom.Domain, Path]:
    name = f"devbox-sweeptest-{uuid.uuid4().hex[:8]}"
    overlay = tmp_path / "run" / "r1" / f"{name}.qcow2"
    overlay.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(overlay), "64M"], check=True)
    (tmp_path / "code").mkdir(exist_ok=True)
    spec = domain_xml.DomainSpec(
        name=name,
        disk=overlay,
        code_dir=tmp_path / "code",
        share="9p",
        accel="tcg",
        console_log=tmp_path / f"{name}.log",
        memory_mib=128,
        vcpus=1,
        metadata={
            "owner_pid": str(owner_pid),
            "owner": token_of(owner_pid),
            "overlay": str(overlay),
            "keep": "1" if keep else "0",
        },
    )
    # Not autodestroyed: what a libvirtd restart or a lost connection leaves behind.
    return dom.Domain.create(dom.connect(URI), spec, autodestroy=False), overlay


@pytest.fixture
def cleanup() -> Iterator[list[dom.Domain]]:
    made: list[dom.Domain] = []
    yield made
    for d in made:
        d.destroy()


def test_dead_owners_guest_and_overlay_are_swept(tmp_path: Path, cleanup: list[dom.Domain]) -> None:
    d, overlay = _leftover(tmp_path, _dead_pid(), keep=False)
    cleanup.append(d)
    pid = _dead_pid()
    (tmp_path / "run" / "r1" / "owner").write_text(f"{pid}\nh\n{token_of(pid)}\n")
    done = sweep_leftovers(URI, tmp_path)
    assert not d.is_running()
    assert not overlay.exists()
    assert not (tmp_path / "run" / "r1").exists()
    assert any(d.name in line for line in done)


def test_live_owner_and_kept_guests_are_spared(tmp_path: Path, cleanup: list[dom.Domain]) -> None:
    live, live_overlay = _leftover(tmp_path, os.getpid(), keep=False)
    kept, kept_overlay = _leftover(tmp_path, _dead_pid(), keep=True)
    dead, _ = _leftover(tmp_path, _dead_pid(), keep=False)
    cleanup += [live, kept, dead]
    live_run = claim_run_dir(tmp_path, "live-run")
    done = sweep_leftovers(URI, tmp_path)
    # The sweep really ran (it took the dead owner's guest) and spared the others.
    assert not dead.is_running()
    assert any(dead.name in line for line in done)
    assert live.is_running() and kept.is_running()
    assert live_overlay.exists() and kept_overlay.exists()
    assert live_run.is_dir()


def test_a_run_dir_is_never_seen_without_its_owner(tmp_path: Path) -> None:
    # Defect: the run dir used to exist a moment before its owner file, and a
    # concurrent sweep deleted it (then writing the owner raised FileNotFoundError).
    stop = threading.Event()

    def sweep_repeatedly() -> None:
        while not stop.is_set():
            sweep_leftovers(URI, tmp_path)

    sweeper = threading.Thread(target=sweep_repeatedly)
    sweeper.start()
    try:
        claimed = [claim_run_dir(tmp_path, f"run{i}") for i in range(300)]
    finally:
        stop.set()
        sweeper.join()
    assert all(read_owner(d)[0] == os.getpid() for d in claimed)
    assert not list((tmp_path / "run").glob(".claim-*"))


def test_claiming_twice_in_one_session_keeps_the_dir(tmp_path: Path) -> None:
    first = claim_run_dir(tmp_path, "same")
    (first / "overlay.qcow2").write_text("x")
    assert claim_run_dir(tmp_path, "same") == first
    assert (first / "overlay.qcow2").exists()

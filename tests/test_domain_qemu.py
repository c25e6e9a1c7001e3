"""Domains on the host's real libvirtd and QEMU, with no OS (the guest sits in the BIOS):
forwarding, share devices, AUTODESTROY on SIGKILL. VM tier: it uses qemu:///system."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import libvirt
import libvirt_qemu
import pytest
from test_domain import spec_for

from pytest_devbox.virt import domain as dom
from pytest_devbox.virt import domain_xml

pytestmark = pytest.mark.vm

QEMU_URI = "qemu:///system"


@pytest.fixture
def qemuconn() -> Iterator[libvirt.virConnect]:
    conn = dom.connect(QEMU_URI)
    yield conn
    conn.close()
    # libvirtd keeps a log per domain name (and per virtiofsd); ours are unique per run.
    for log in Path("/var/log/libvirt/qemu").glob(f"devbox-test-{os.getpid()}-*.log"):
        log.unlink(missing_ok=True)


def unique_name() -> str:
    return f"devbox-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def empty_disk(tmp_path: Path) -> Path:
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    return disk


def real_spec(tmp_path: Path, share: str, **kw: object) -> domain_xml.DomainSpec:
    code = tmp_path / "code"
    code.mkdir(exist_ok=True)
    return spec_for(
        share,
        "tcg",
        name=unique_name(),
        disk=empty_disk(tmp_path),
        code_dir=code,
        console_log=tmp_path / "console.log",
        memory_mib=128,
        vcpus=1,
        **kw,
    )


def names(conn: libvirt.virConnect) -> list[str]:
    return [d.name() for d in conn.listAllDomains(0)]


def listeners(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp*) listening on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.split(":")
            if state == "0A" and int(hexport, 16) == port:
                found.append(addr)
    return found


def test_real_domain_forward_port_and_destroy(qemuconn: libvirt.virConnect, tmp_path: Path) -> None:
    spec = real_spec(tmp_path, "9p")
    t0 = time.monotonic()
    d = dom.Domain.create(qemuconn, spec)
    try:
        assert d.state() == "running"
        port = d.forward_port(22)
        other = d.forward_port(22)
        assert port != other
        for p in (port, other):
            assert listeners(p) == ["0100007F"]  # 127.0.0.1 only, never 0.0.0.0
            socket.create_connection(("127.0.0.1", p), timeout=5).close()
        # The BIOS reports the empty disk on the serial console log.
        deadline = time.monotonic() + 30
        while "No bootable device" not in spec.console_log.read_text(errors="replace"):
            assert time.monotonic() < deadline, spec.console_log.read_text(errors="replace")
            time.sleep(0.1)
    finally:
        d.destroy()
    print(f"create + 2 forwards + BIOS + destroy: {time.monotonic() - t0:.2f} s")
    assert spec.name not in names(qemuconn)
    assert d.state() == "shutoff"
    assert listeners(port) == []
    d.destroy()  # idempotent


@pytest.mark.parametrize("share", ["virtiofs", "9p"])
def test_real_share_devices(qemuconn: libvirt.virConnect, tmp_path: Path, share: str) -> None:
    spec = real_spec(tmp_path, share)
    d = dom.Domain.create(qemuconn, spec)
    try:
        qtree = libvirt_qemu.qemuMonitorCommand(
            d.virdom, "info qtree", libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
        )
        device = "vhost-user-fs-pci" if share == "virtiofs" else "virtio-9p-pci"
        assert f"dev: {device}" in qtree
        if share == "virtiofs":  # libvirt found and started virtiofsd on our directory
            cmdlines = [
                p.read_bytes().replace(b"\0", b" ").decode()
                for p in Path("/proc").glob("[0-9]*/cmdline")
                if p.exists()
            ]
            assert any("virtiofsd" in c and f"source={spec.code_dir}" in c for c in cmdlines), (
                cmdlines
            )
    finally:
        d.destroy()
    assert spec.name not in names(qemuconn)


def test_real_autodestroy_survives_sigkill(qemuconn: libvirt.virConnect, tmp_path: Path) -> None:
    spec = real_spec(tmp_path, "9p")
    child = textwrap.dedent(f"""\
        import sys, time
        from pathlib import Path
        from pytest_devbox.virt import domain as dom
        from pytest_devbox.virt import domain_xml
        spec = domain_xml.DomainSpec(name={spec.name!r}, disk=Path({str(spec.disk)!r}),
            code_dir=Path({str(spec.code_dir)!r}), share="9p", accel="tcg",
            console_log=Path({str(spec.console_log)!r}), memory_mib=128, vcpus=1)
        d = dom.Domain.create(dom.connect({QEMU_URI!r}), spec)
        print("up", flush=True)
        time.sleep(600)
        """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "up\n"
        assert spec.name in names(qemuconn)
        proc.kill()  # SIGKILL: no Python cleanup runs
        proc.wait()
        t0 = time.monotonic()
        while spec.name in names(qemuconn):
            assert time.monotonic() - t0 < 15, "libvirtd did not autodestroy the domain"
            time.sleep(0.1)
        print(f"domain gone {time.monotonic() - t0:.2f} s after SIGKILL")
    finally:
        proc.kill()
        proc.wait()
        with contextlib.suppress(libvirt.libvirtError):  # already gone: the expected case
            qemuconn.lookupByName(spec.name).destroy()

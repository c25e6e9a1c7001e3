"""The domain layer: XML builder (golden files), libvirt errors, lifecycle.

Golden files live in tests/data/domain/. After an intended change to the XML, rewrite
them with `UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_domain.py` and review
the diff. Lifecycle tests use the libvirt test:///default driver; AUTODESTROY, monitor
commands (port forwarding) and the share devices need real QEMU: test_domain_qemu.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from pytest_devbox.errors import DomainError, HostNotReady
from pytest_devbox.virt import domain as dom
from pytest_devbox.virt import domain_xml

DATA = Path(__file__).parent / "data" / "domain"


def spec_for(share: str, accel: str, **kw: object) -> domain_xml.DomainSpec:
    args: dict[str, object] = {
        "name": "devbox-debian-12-r0a1b2c3",
        "disk": Path("/var/cache/pytest-devbox/run/r0a1b2c3/devbox-debian-12-r0a1b2c3.qcow2"),
        "code_dir": Path("/home/dev/project"),
        "share": share,
        "accel": accel,
        "console_log": Path("/var/cache/pytest-devbox/run/r0a1b2c3/console.log"),
        # virtiofs cannot map guest ids here: it is only ever the passthrough opt-in.
        "ids": "passthrough" if share == "virtiofs" else "mapped",
    }
    args.update(kw)
    return domain_xml.DomainSpec(**args)  # type: ignore[arg-type]


def check_golden(name: str, text: str) -> None:
    path = DATA / name
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} is missing: run with UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), f"{name} changed: review, then UPDATE_GOLDEN=1"


# --- XML ------------------------------------------------------------------------------

GOLDEN = {
    "virtiofs-tcg.xml": spec_for("virtiofs", "tcg"),
    "9p-kvm.xml": spec_for("9p", "kvm", memory_mib=2048, vcpus=1),
    # A workstation: QEMU runs as the calling user; 9p mapped all the same.
    "9p-as-user.xml": spec_for("9p", "tcg", run_as=(1000, 1000), qemu_is_root=False),
    # A profile with firmware = "uefi": OVMF chosen by libvirt, secure boot off.
    "9p-uefi.xml": spec_for("9p", "tcg", firmware="uefi"),
    "metadata.xml": spec_for(
        "9p",
        "tcg",
        # deliberately unsorted: the XML must not depend on dict order
        metadata={
            "started": "1764100000",
            "owner_pid": "4242",
            "run_id": "r0a1b2c3",
            "distro": "debian-12",
        },
    ),
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden(name: str) -> None:
    check_golden(name, domain_xml.build_xml(GOLDEN[name]))


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_xml_is_valid_for_libvirt_schema(name: str) -> None:
    # START_VALIDATE checks the XML against libvirt's RelaxNG schema (domain.rng), so
    # a misspelt element or attribute fails here instead of being silently dropped.
    conn = dom.connect("test:///default")
    try:
        conn.createXML(domain_xml.build_xml(GOLDEN[name]), libvirt.VIR_DOMAIN_START_VALIDATE)
    finally:
        conn.close()


def test_build_is_deterministic() -> None:
    spec = GOLDEN["metadata.xml"]
    reordered = spec_for("9p", "tcg", metadata=dict(reversed(list(spec.metadata.items()))))
    assert domain_xml.build_xml(spec) == domain_xml.build_xml(reordered)


def test_accel_and_share_shape_the_xml() -> None:
    tcg = ET.fromstring(domain_xml.build_xml(spec_for("virtiofs", "tcg")))
    assert tcg.get("type") == "qemu"
    assert tcg.find("memoryBacking/source").get("type") == "memfd"  # type: ignore[union-attr]
    assert tcg.find("devices/filesystem/driver").get("type") == "virtiofs"  # type: ignore[union-attr]
    kvm = ET.fromstring(domain_xml.build_xml(spec_for("9p", "kvm")))
    assert kvm.get("type") == "kvm"
    assert kvm.find("cpu").get("mode") == "host-passthrough"  # type: ignore[union-attr]
    assert kvm.find("memoryBacking") is None
    assert kvm.find("devices/filesystem/driver") is None


def test_metadata_round_trip() -> None:
    meta = {
        "owner_pid": "123",
        "run_id": "abc",
        "odd key & <stuff>": "value with 'quotes' & \"more\" <tags>",
        "unicode": "héllo ✓",
        "empty": "",
    }
    assert (
        domain_xml.read_metadata(domain_xml.build_xml(spec_for("9p", "tcg", metadata=meta))) == meta
    )


def test_read_metadata_of_foreign_domain_is_empty() -> None:
    assert domain_xml.read_metadata("<domain type='kvm'><name>other</name></domain>") == {}
    assert (
        domain_xml.read_metadata("<domain><metadata><x:y xmlns:x='urn:other'/></metadata></domain>")
        == {}
    )


def test_odd_paths_are_escaped() -> None:
    odd = Path('/tmp/R&D\'s "code" <dir>')
    xml = domain_xml.build_xml(spec_for("virtiofs", "tcg", code_dir=odd, disk=odd / "d.qcow2"))
    assert "R&amp;D's" in xml  # escaped by ElementTree, not by hand
    root = ET.fromstring(xml)
    assert root.find("devices/filesystem/source").get("dir") == str(odd)  # type: ignore[union-attr]
    assert root.find("devices/disk/source").get("file") == str(odd / "d.qcow2")  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("field", "value"),
    [("name", "debian-12"), ("share", "nfs"), ("accel", "hvf")],
)
def test_bad_spec_is_refused(field: str, value: str) -> None:
    kw = {"share": "9p", "accel": "tcg", field: value}
    with pytest.raises(DomainError, match=value):
        spec_for(kw.pop("share"), kw.pop("accel"), **kw)


def test_forwards_parses_info_usernet() -> None:
    # Verbatim from qemu 7.2 (plus an established connection, which is not a forward).
    out = textwrap.dedent("""\
        Hub -1 (hostua-devbox-net):
          Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ
          TCP[HOST_FORWARD]  22       127.0.0.1 35799       10.0.2.15    22     0     0
          TCP[HOST_FORWARD]  23       127.0.0.1 41000       10.0.2.15  8080     0     0
          TCP[ESTABLISHED]   24       10.0.2.15 51234      10.0.2.2    80     0     0
        """)
    assert dom._forwards(out) == {("127.0.0.1", 35799, 22), ("127.0.0.1", 41000, 8080)}


# --- connect --------------------------------------------------------------------------


def test_connect_to_missing_socket_says_start_libvirtd() -> None:
    with pytest.raises(HostNotReady) as e:
        dom.connect("qemu:///system?socket=/nonexistent/libvirt-sock")
    assert "libvirtd is not running" in str(e.value)
    assert "libvirtd -d" in str(e.value)
    assert "/nonexistent" in str(e.value)


def test_connect_to_unknown_driver_says_check_uri() -> None:
    with pytest.raises(HostNotReady, match="--devbox-uri"):
        dom.connect("nosuchdriver:///system")


AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _nobody_cannot_import() -> str:
    """Why `nobody` cannot import the package with this interpreter ('' when it can):
    a venv or a checkout under /root is out of its reach."""
    probe = [*AS_NOBODY, sys.executable, "-c", "import libvirt, pytest_devbox.virt.domain"]
    r = subprocess.run(probe, capture_output=True, text=True, check=False, cwd="/")
    return "" if r.returncode == 0 else (r.stderr.strip().splitlines() or ["?"])[-1]


def test_connect_permission_denied_says_join_libvirt_group(tmp_path: Path) -> None:
    # A real listening socket the connecting user may not reach.
    locked = tmp_path / "locked"
    locked.mkdir()
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(locked / "sock"))
    server.listen()
    locked.chmod(0o700)
    code = (
        "from pytest_devbox.virt.domain import connect\n"
        f"connect('qemu:///system?socket={locked}/sock')\n"
    )
    cmd = [sys.executable, "-c", code]
    if os.geteuid() == 0:  # root passes any permission check: try as nobody
        cmd = [*AS_NOBODY, *cmd]
        problem = _nobody_cannot_import()
        if problem:
            server.close()
            pytest.skip(f"nobody cannot run this interpreter with pytest_devbox: {problem}")
    else:
        locked.chmod(0o000)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd="/")
    finally:
        locked.chmod(0o700)
        server.close()
    assert "HostNotReady: no permission to use libvirt" in r.stderr, r.stderr
    assert "libvirt group" in r.stderr
    assert "qemu:///session" in r.stderr


# --- lifecycle on the test:///default driver ------------------------------------------


@pytest.fixture
def testconn() -> Iterator[libvirt.virConnect]:
    conn = dom.connect("test:///default")  # a fresh in-memory host per connection
    yield conn
    conn.close()


def test_lifecycle_on_test_driver(testconn: libvirt.virConnect) -> None:
    spec = spec_for("virtiofs", "tcg", metadata={"run_id": "r1", "owner_pid": "7"})
    d = dom.Domain.create(testconn, spec, autodestroy=False)
    assert d.name == spec.name
    assert d.state() == "running" and d.is_running()
    d.virdom.suspend()
    assert d.state() == "paused" and not d.is_running()
    d.virdom.resume()
    assert [n for n, _ in dom.list_devbox_domains(testconn)] == [spec.name]
    d.destroy()
    assert d.state() == "shutoff"  # transient: it no longer exists at all
    d.destroy()  # idempotent
    assert dom.list_devbox_domains(testconn) == []


def test_list_devbox_domains_filters_and_reads_metadata(testconn: libvirt.virConnect) -> None:
    # test:///default has a domain "test" of its own: not ours, not listed.
    assert "test" in [d.name() for d in testconn.listAllDomains(0)]
    for i, share in enumerate(("9p", "virtiofs")):
        name = f"devbox-debian-1{i}-run{i}"
        meta = {"run_id": f"run{i}", "distro": f"debian-1{i}"}
        dom.Domain.create(
            testconn, spec_for(share, "tcg", name=name, metadata=meta), autodestroy=False
        )
    assert dom.list_devbox_domains(testconn) == [
        ("devbox-debian-10-run0", {"distro": "debian-10", "run_id": "run0"}),
        ("devbox-debian-11-run1", {"distro": "debian-11", "run_id": "run1"}),
    ]


def test_odd_paths_survive_libvirt(testconn: libvirt.virConnect) -> None:
    odd = Path('/tmp/R&D\'s "code" <dir>')
    d = dom.Domain.create(testconn, spec_for("9p", "tcg", code_dir=odd), autodestroy=False)
    fs = ET.fromstring(d.virdom.XMLDesc(0)).find("devices/filesystem/source")
    assert fs is not None and fs.get("dir") == str(odd)


def test_create_failure_is_a_domain_error(testconn: libvirt.virConnect) -> None:
    # The test driver supports no AUTODESTROY: a real libvirt refusal, wrapped.
    with pytest.raises(DomainError, match="could not start devbox-debian-12-r0a1b2c3"):
        dom.Domain.create(testconn, spec_for("9p", "tcg"))


def test_forward_port_without_qemu_is_a_domain_error(testconn: libvirt.virConnect) -> None:
    d = dom.Domain.create(testconn, spec_for("9p", "tcg"), autodestroy=False)
    with pytest.raises(DomainError, match="QEMU monitor command"):
        d.forward_port()

"""Topologies without a guest (fast tier): the private link's XML and what a restore
and a save key make of it, the guest-side command, and the devbox_topology marker's
parametrization seen from a user's pytest run (pytester; nothing boots)."""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pytest_devbox.config.settings import Settings
from pytest_devbox.errors import DevboxError, DomainError
from pytest_devbox.guest.restore import restore_xml
from pytest_devbox.guest.topology import address_of, check_role, join_command
from pytest_devbox.pool.link_hub import Hub, free_udp_ports
from pytest_devbox.pool.topology import MAX_ROLES, check_roles, host_of, mac_of
from pytest_devbox.virt import domain_xml
from pytest_devbox.virt.domain_xml import DomainSpec, PrivateLink, build_xml

BAD_URI = "qemu:///system?socket=/nonexistent"
LINK_NIC = """\
    <interface type="udp">
      <mac address="52:54:00:d7:77:01" />
      <source address="127.0.0.1" port="40002">
        <local address="127.0.0.1" port="40001" />
      </source>
      <model type="virtio" />
      <rom enabled="no" />
    </interface>
"""


def _spec(tmp_path: Path, link: PrivateLink | None = None) -> DomainSpec:
    return DomainSpec(
        name="devbox-debian-12-abcd1234-0000",
        disk=tmp_path / "disk.qcow2",
        code_dir=tmp_path,
        share="9p",
        accel="tcg",
        console_log=tmp_path / "console.log",
        link=link,
    )


def test_the_link_is_a_second_udp_nic_on_loopback(tmp_path: Path) -> None:
    link = PrivateLink(mac_of(1), 40001, 40002)
    plain, linked = build_xml(_spec(tmp_path)), build_xml(_spec(tmp_path, link))
    assert LINK_NIC in linked
    # The user NIC (the way out) stays first; without a link nothing else changes.
    assert linked.index('type="user"') < linked.index('type="udp"')
    assert linked.replace(LINK_NIC, "") == plain


def test_the_link_is_accepted_by_libvirt(tmp_path: Path) -> None:
    import libvirt

    conn = libvirt.open("test:///default")
    try:
        xml = build_xml(_spec(tmp_path, PrivateLink(mac_of(2), 40003, 40004)))
        dom = conn.defineXML(xml)
        try:
            back = ET.fromstring(dom.XMLDesc(0))
            source = back.find("devices/interface[@type='udp']/source")
            assert source is not None and source.get("port") == "40004"
            local = source.find("local")
            assert local is not None and local.attrib == {"address": "127.0.0.1", "port": "40003"}
        finally:
            dom.undefine()
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("mac", "ports", "says"),
    [("aa:bb:cc:dd:ee:ff", (1, 2), "MAC"), (mac_of(1), (1, 70000), "not a UDP port")],
)
def test_a_bad_link_is_refused(mac: str, ports: tuple[int, int], says: str) -> None:
    with pytest.raises(DomainError, match=says):
        PrivateLink(mac, *ports)


def test_a_restore_is_given_the_ports_and_the_key_ignores_them(tmp_path: Path) -> None:
    saved = build_xml(_spec(tmp_path, PrivateLink(mac_of(1), 40001, 40002)))
    other = PrivateLink(mac_of(1), 50001, 50002)
    xml = restore_xml(
        saved,
        disk=tmp_path / "new.qcow2",
        code_dir=tmp_path,
        console_log=tmp_path / "c.log",
        metadata={},
        link=other,
    )
    source = ET.fromstring(xml).find("devices/interface[@type='udp']/source")
    assert source is not None and source.get("port") == "50002"
    local = source.find("local")
    assert local is not None and local.get("port") == "50001"
    # What a save key hashes: the shape (MAC, presence), not the ports.
    shape = dataclasses.replace(_spec(tmp_path, other), link=other.shape())
    assert build_xml(shape) == build_xml(
        dataclasses.replace(_spec(tmp_path), link=PrivateLink(mac_of(1), 40001, 40002).shape())
    )
    assert build_xml(shape) != build_xml(_spec(tmp_path))
    assert build_xml(shape) != build_xml(_spec(tmp_path, PrivateLink(mac_of(2), 0, 0)))


def test_a_save_without_the_link_cannot_restore_with_it(tmp_path: Path) -> None:
    with pytest.raises(DomainError, match="no private link NIC"):
        restore_xml(
            build_xml(_spec(tmp_path)),
            disk=tmp_path / "d",
            code_dir=tmp_path,
            console_log=tmp_path / "c",
            metadata={},
            link=PrivateLink(mac_of(1), 1, 2),
        )


def test_free_udp_ports_are_distinct_and_free() -> None:
    ports = free_udp_ports(2)
    assert len(set(ports)) == 2
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((domain_xml.LINK_HOST, port))


def test_roles_are_host_names_two_to_eight() -> None:
    assert check_role("db-1") == "db-1"
    with pytest.raises(DevboxError, match="not a host name"):
        check_role("Server_1")
    check_roles({"a": "debian-12", "b": "debian-12", "c": "debian-12"})
    for count in (1, MAX_ROLES + 1):
        with pytest.raises(DevboxError, match=f"2 to {MAX_ROLES} roles"):
            check_roles({f"r{i}": "debian-12" for i in range(count)})
    assert address_of(2) == "10.77.0.2"


def test_the_join_command_is_valid_shell() -> None:
    cmd = join_command(mac_of(1), address_of(1), {"server": "10.77.0.1", "client": "10.77.0.2"})
    assert subprocess.run(["sh", "-n", "-c", cmd], check=False).returncode == 0
    assert "10.77.0.1 server" in cmd and "ip addr add 10.77.0.1/24" in cmd


# --- the marker, from a user's pytest run ----------------------------------------------


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PYTEST_DEVBOX", raising=False)
    monkeypatch.setenv("PYTEST_DEVBOX_CACHE", str(tmp_path / "cache"))


PAIRS = """
import pytest

@pytest.mark.devbox_topology(server="*", client="*")
def test_pairs(devbox_topology):
    pass

@pytest.mark.devbox_topology(server="debian-12", client="*")
def test_one_fixed(devbox_topology):
    pass

@pytest.mark.devbox("debian-11")
@pytest.mark.devbox_topology(server="debian-12", client="*")
def test_narrowed(devbox_topology):
    pass
"""


def test_stars_run_every_pair(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(PAIRS)
    result = pytester.runpytest("--collect-only", "-q", "--devbox=debian-11,debian-12")
    result.stdout.fnmatch_lines(
        [
            "*test_pairs[[]server=debian-11,client=debian-11[]]",
            "*test_pairs[[]server=debian-11,client=debian-12[]]",
            "*test_pairs[[]server=debian-12,client=debian-11[]]",
            "*test_pairs[[]server=debian-12,client=debian-12[]]",
            "*test_one_fixed[[]server=debian-12,client=debian-11[]]",
            "*test_one_fixed[[]server=debian-12,client=debian-12[]]",
            "*test_narrowed[[]server=debian-12,client=debian-11[]]",
            "7 tests collected*",
        ]
    )


def test_a_role_on_an_unselected_distro_skips(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.devbox_topology(server="debian-13", client="*")
        def test_needs_13(devbox_topology):
            pass

        @pytest.mark.devbox_topology(server="*", client="*")
        def test_nothing_selected(devbox_topology):
            pass
        """
    )
    result = pytester.runpytest_subprocess("-rs", f"--devbox-uri={BAD_URI}", "--devbox=debian-12")
    result.assert_outcomes(skipped=1, errors=1)  # the other one tries libvirt (gone)
    result.stdout.fnmatch_lines(
        ["SKIPPED*devbox_topology role server runs on debian-13, which is not selected*"]
    )
    none = pytester.runpytest_subprocess("-rs", "--devbox=")
    none.assert_outcomes(skipped=2)


@pytest.mark.parametrize(
    ("marker", "says"),
    [
        ('("debian-12")', "takes role=distro keywords"),
        ('(server="debain-12", client="*")', "role server='debain-12' names no known distro"),
        ('(server="*")', "has 2 to 8 roles"),
        ('(Server="*", client="*")', "not a host name"),
        ("", "needs @pytest.mark.devbox_topology("),
    ],
)
def test_bad_marker_arguments_say_how(pytester: pytest.Pytester, marker: str, says: str) -> None:
    mark = f"@pytest.mark.devbox_topology{marker}\n" if marker else ""
    pytester.makepyfile(f"import pytest\n{mark}def test_t(devbox_topology):\n    pass\n")
    result = pytester.runpytest("--collect-only", "--devbox=debian-12")
    assert result.ret != 0
    result.stdout.fnmatch_lines([f"*{says}*"])


def test_the_marker_is_registered(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.devbox_topology(**roles):*"])


def test_a_group_runs_on_one_host_and_a_hub_only_on_this_one() -> None:
    two = {"server": "debian-12", "client": "debian-11"}
    three = {**two, "db": "debian-12"}
    remote = "qemu+ssh://builder@farm/system"
    assert host_of(Settings(uri="qemu:///system"), three) == "qemu:///system"
    assert host_of(Settings(uri=remote), two) == remote  # a direct link works there
    with pytest.raises(DevboxError, match="needs its guests on this host"):
        host_of(Settings(uri=remote), three)
    split = Settings(uri="qemu:///system", hosts=(("debian-11", remote),))
    with pytest.raises(DevboxError, match="run on one libvirt host"):
        host_of(split, two)


def _member() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((domain_xml.LINK_HOST, 0))
    s.settimeout(5)
    return s


def test_the_hub_relays_each_frame_to_the_other_members_only() -> None:
    members = [_member() for _ in range(3)]
    stranger = _member()
    ports = [m.getsockname()[1] for m in members]
    try:
        with Hub(ports) as hub:
            to_hub = (domain_xml.LINK_HOST, hub.port)
            stranger.sendto(b"from outside", to_hub)
            members[0].sendto(b"frame-0", to_hub)
            for m in members[1:]:
                assert m.recvfrom(100) == (b"frame-0", to_hub)
            members[2].sendto(b"frame-2", to_hub)
            for m in members[:2]:
                assert m.recv(100) == b"frame-2"  # never the stranger's datagram
            members[0].settimeout(0.3)
            with pytest.raises(socket.timeout):  # its own frames do not come back
                members[0].recv(100)
            assert (hub.relayed, hub.dropped) == (2, 1)
        # Closed: nothing is relayed any more, and its port is free again.
        members[0].sendto(b"after", to_hub)
        members[1].settimeout(0.3)
        with pytest.raises(socket.timeout):
            members[1].recv(100)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
            again.bind(to_hub)
    finally:
        for s in [*members, stranger]:
            s.close()

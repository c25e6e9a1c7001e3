"""host/stack.py: the version rules for restoring virtiofs guests and mapping their ids,
with the versions the hosts users have ship, and the probe of this host's virtiofsd.

Versions: Debian 12 and 13 as installed here and in a Debian 13 root (mmdebstrap of
trixie); Ubuntu 24.04 from the issue (libvirt 10.0, QEMU 8.2) and its virtiofsd 1.10.0
(Ubuntu's noble package, as a public project's tests record it); Fedora 42's libvirt
11.0, QEMU 9.2 and virtiofsd 1.13 from Fedora's package set (not runnable here).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from pytest_devbox.host import stack
from pytest_devbox.host.stack import Stack, Virtiofsd, decode, parse_version, vhost_user_binary

C_72 = Virtiofsd("/usr/lib/qemu/virtiofsd", "c", (7, 2, 22))
RUST = ("migrate-precopy", "separate-options")
HOSTS = {
    "debian-12": Stack((9, 0, 0), (7, 2, 22), C_72),
    "debian-13": Stack(
        (11, 3, 0), (10, 0, 13), Virtiofsd("/usr/libexec/virtiofsd", "rust", (1, 13, 2), RUST)
    ),
    "ubuntu-24.04": Stack(
        (10, 0, 0), (8, 2, 2), Virtiofsd("/usr/libexec/virtiofsd", "rust", (1, 10, 0))
    ),
    "fedora-42": Stack(
        (11, 0, 0), (9, 2, 4), Virtiofsd("/usr/libexec/virtiofsd", "rust", (1, 13, 1), RUST)
    ),
}


def test_libvirt_integer_versions_decode() -> None:
    assert decode(9000000) == (9, 0, 0)
    assert decode(11003000) == (11, 3, 0)
    assert decode(7002022) == (7, 2, 22)


def test_version_strings_of_both_daemons_parse() -> None:
    assert parse_version("virtiofsd 1.13.2\n") == (1, 13, 2)
    assert parse_version("virtiofsd version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)") == (
        7,
        2,
        22,
    )
    assert parse_version("no digits") is None


@pytest.mark.parametrize(
    "host,restores",
    [("debian-12", False), ("debian-13", True), ("ubuntu-24.04", False), ("fedora-42", True)],
)
def test_which_hosts_restore_virtiofs_guests(host: str, restores: bool) -> None:
    assert HOSTS[host].virtiofs_restore is restores


def test_debian_12_names_every_part_that_blocks_and_what_would_restore() -> None:
    line = HOSTS["debian-12"].restore_line()
    assert line.startswith("virtiofs guests boot in full: QEMU 7.2.22 (needs >= 8.2.0)")
    assert "C virtiofsd (QEMU's) 7.2.22" in line and "libvirt 9.0.0 (needs >= 10.5.0)" in line
    assert (
        "They restore with QEMU >= 8.2.0, the Rust virtiofsd >= 1.11.0 and libvirt >= 10.5.0"
        in (line)
    )


def test_ubuntu_24_04_is_held_back_by_libvirt_and_its_virtiofsd_not_by_qemu() -> None:
    problem = HOSTS["ubuntu-24.04"].restore_problem() or ""
    assert "QEMU" not in problem.split(";")[0]
    assert "Rust virtiofsd 1.10.0" in problem and "libvirt 10.0.0" in problem


def test_each_minimum_is_its_own_boundary() -> None:
    good = HOSTS["debian-13"]
    assert Stack((10, 5, 0), (8, 2, 0), good.virtiofsd).virtiofs_restore
    assert not Stack((10, 4, 0), (10, 0, 13), good.virtiofsd).virtiofs_restore
    assert not Stack((11, 3, 0), (8, 1, 5), good.virtiofsd).virtiofs_restore
    old = Virtiofsd("/usr/libexec/virtiofsd", "rust", (1, 10, 1))
    assert not Stack((11, 3, 0), (10, 0, 13), old).virtiofs_restore
    quiet = Virtiofsd("/usr/libexec/virtiofsd", "rust", (1, 13, 2), ("separate-options",))
    assert "does not offer migrate-precopy" in (
        Stack((11, 3, 0), (10, 0, 13), quiet).restore_problem() or ""
    )


def test_ids_are_mapped_only_by_an_unprivileged_daemon() -> None:
    system = HOSTS["debian-13"]
    assert not system.id_mapping
    assert "starts virtiofsd as root" in (system.id_mapping_problem() or "")
    session = Stack(system.libvirt, system.qemu, system.virtiofsd, session=True)
    if shutil.which("newuidmap"):
        assert session.id_mapping
    else:
        assert session.id_mapping_problem() == "no newuidmap (install the uidmap package)"
    old = Stack((9, 0, 0), (7, 2, 22), C_72, session=True)
    assert "needs >= 10.0.0" in (old.id_mapping_problem() or "")


def test_libvirt_s_choice_of_virtiofsd_is_its_vhost_user_description(tmp_path: Path) -> None:
    binary = tmp_path / "virtiofsd"
    binary.write_text("#!/bin/sh\necho 'virtiofsd 1.13.2'\n")
    binary.chmod(0o755)
    d = tmp_path / "vhost-user"
    d.mkdir()
    (d / "40-gpu.json").write_text(json.dumps({"type": "gpu", "binary": "/bin/true"}))
    (d / "50-virtiofsd.json").write_text(json.dumps({"type": "fs", "binary": str(binary)}))
    assert vhost_user_binary((str(tmp_path / "none"), str(d))) == str(binary)


def test_a_rust_daemon_is_told_from_its_version_and_capabilities(tmp_path: Path) -> None:
    fake = tmp_path / "virtiofsd"
    caps = json.dumps({"type": "fs", "features": list(RUST)})
    fake.write_text(
        f"#!/bin/sh\ncase $1 in --version) echo 'virtiofsd 1.13.2';; *) echo '{caps}';; esac\n"
    )
    fake.chmod(0o755)
    got = stack.probe_virtiofsd(str(fake))
    assert (got.kind, got.version, got.features) == ("rust", (1, 13, 2), RUST)


@pytest.mark.skipif(
    not os.access("/usr/lib/qemu/virtiofsd", os.X_OK) or os.path.islink("/usr/lib/qemu/virtiofsd"),
    reason="no C virtiofsd (QEMU <= 7.2; Debian 13 links that path to the Rust one)",
)
def test_this_host_s_c_virtiofsd_is_probed_as_one() -> None:
    got = stack.probe_virtiofsd("/usr/lib/qemu/virtiofsd")
    assert got.kind == "c" and got.version is not None and got.version[0] <= 7

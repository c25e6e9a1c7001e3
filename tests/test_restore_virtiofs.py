"""Virtiofs guests restored from save slots (VM tier), where the host stack can save
them (host/stack.py: QEMU >= 8.2, the Rust virtiofsd >= 1.11, libvirt >= 10.5; on
Debian 12 these skip, saying which versions are missing). Run in a Debian 13 host.

virtiofs passes guest ids through under libvirt's system daemon, so these guests are
opted in with code_ids="passthrough" (config/code_ids.py), as a user would.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest
from guests import GUEST_GID, GUEST_UID

from pytest_devbox.config.profiles import BUILTIN_PROFILES
from pytest_devbox.config.settings import Settings
from pytest_devbox.guest.machine import Machine
from pytest_devbox.guest.restore import stack_at
from pytest_devbox.host.stack import Stack
from pytest_devbox.image.cache import ImageCache
from pytest_devbox.pool.pool import Pool
from pytest_devbox.virt import domain as dom
from pytest_devbox.virt import domain_xml

# host_tier: scripts/host-test runs these in its Debian 13 root, where the stack saves virtiofs.
pytestmark = [pytest.mark.vm, pytest.mark.host_tier]

URI = "qemu:///system"
PROFILE = BUILTIN_PROFILES["debian-12"]  # a virtiofs profile


@pytest.fixture(scope="module")
def stack() -> Stack:
    found = stack_at(URI)
    if found is None:
        pytest.skip(f"libvirt at {URI} cannot be reached")
    if not found.virtiofs_restore:
        pytest.skip(f"{found.describe()}: {found.restore_line()}")
    return found


@pytest.fixture(scope="module")
def rust_stack() -> Stack:
    found = stack_at(URI)
    if found is None or found.virtiofsd.kind != "rust":
        pytest.skip(f"no Rust virtiofsd: {found.describe() if found else URI}")
    return found


def _restore(cache: ImageCache, code_dir: Path) -> Machine:
    return Machine.restore(
        PROFILE, cache=cache, code_dir=code_dir, uri=URI, share="virtiofs", code_ids="passthrough"
    )


def _code(tmp: Path, name: str) -> Path:
    d = tmp / name
    d.mkdir()
    (d / "which.txt").write_text(f"{name}\n")
    if os.geteuid() == 0:  # the guest user writes there (ids pass through)
        os.chown(d, GUEST_UID, GUEST_GID)
    return d


def test_virtiofs_guests_restore_onto_another_code_dir_and_stay_distinct(
    stack: Stack, cache: ImageCache, tmp_path: Path
) -> None:
    first_dir, second_dir = _code(tmp_path, "first"), _code(tmp_path, "second")
    first = _restore(cache, first_dir)  # saves the slot first on a cold cache
    try:
        assert first.started == "restored"
        assert first.run("findmnt -no FSTYPE /code").stdout.strip() == "virtiofs"
        assert first.run("cat /code/which.txt").stdout == "first\n"
        first.run("echo from-first > /code/out.txt")
        assert (first_dir / "out.txt").read_text() == "from-first\n"
        first.run("touch /root/only-in-first", user="root")
        # A second clone at once, of another slot, onto another code dir.
        second = _restore(cache, second_dir)
        try:
            assert second.name != first.name
            assert first.domain.is_running() and second.domain.is_running()
            assert second.run("cat /code/which.txt").stdout == "second\n"
            assert second.run("test -e /code/out.txt", check=False).exit_status == 1
            second.run("echo from-second > /code/out.txt")
            assert (second_dir / "out.txt").read_text() == "from-second\n"
            assert (first_dir / "out.txt").read_text() == "from-first\n"
            gone = second.run("test -e /root/only-in-first", check=False, user="root")
            assert gone.exit_status == 1
            # Each clone's virtiofsd serves its own directory: libvirt's live XML says so.
            for m, d in ((first, first_dir), (second, second_dir)):
                live = ET.fromstring(m.domain.virdom.XMLDesc(0))
                assert live.find("devices/filesystem/source").get("dir") == str(d)  # type: ignore[union-attr]
        finally:
            second.close()
    finally:
        first.close()
    print(f"two virtiofs clones on {stack.describe()}")


def test_the_pool_restores_a_virtiofs_profile(
    stack: Stack, cache: ImageCache, tmp_path: Path
) -> None:
    code = _code(tmp_path, "pool")
    lines: list[str] = []
    settings = Settings(
        uri=URI,
        cache_dir=cache.root,
        code_dir=code,
        offline=True,
        share="virtiofs",
        code_ids="passthrough",
    )
    pool = Pool([PROFILE], settings, log=lines.append)
    pool._cache = cache  # the test cache's guest user, so the image is a cache hit
    try:
        assert pool.get(PROFILE.name).run("cat /code/which.txt").stdout == "pool\n"
    finally:
        pool.close()
    stats = pool.stats[PROFILE.name]
    assert (stats.restores, stats.boots) == (1, 0), lines


def test_libvirt_s_idmap_is_refused_by_a_virtiofsd_libvirt_runs_as_root(
    rust_stack: Stack, tmp_path: Path
) -> None:
    """Why id mapping is off under the system daemon (host/stack.py): libvirt passes
    <idmap> on as --uid-map/--gid-map, and virtiofsd refuses those as root. The disk is
    an empty file: were the mapping accepted, QEMU would fail on it instead, and the
    virtiofsd log would not say why."""
    code = _code(tmp_path, "idmap")
    disk = tmp_path / "never-booted.qcow2"
    disk.write_bytes(b"")
    name = "devbox-idmap-probe-" + tmp_path.name[-6:]
    spec = domain_xml.DomainSpec(
        name=name,
        disk=disk,
        code_dir=code,
        share="virtiofs",
        accel="tcg",
        console_log=tmp_path / "console.log",
        ids="passthrough",
    )
    root = ET.fromstring(domain_xml.build_xml(spec))
    fs = root.find("devices/filesystem")
    assert fs is not None
    idmap = ET.SubElement(fs, "idmap")
    ET.SubElement(idmap, "uid", start="0", target="4242", count="1")
    ET.SubElement(idmap, "gid", start="0", target="4242", count="1")
    conn = dom.connect(URI)
    try:
        with pytest.raises(libvirt.libvirtError) as e:
            conn.createXML(
                ET.tostring(root, encoding="unicode"), libvirt.VIR_DOMAIN_START_AUTODESTROY
            )
    finally:
        conn.close()
    logs = sorted(Path("/var/log/libvirt/qemu").glob(f"{name}-*virtiofsd.log"))
    said = "".join(p.read_text(errors="replace") for p in logs)
    print(f"{rust_stack.describe()}: {e.value.get_error_message()}; virtiofsd: {said.strip()}")
    assert "uid_map can only be used by unprivileged user" in said

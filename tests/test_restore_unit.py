"""Restore without a guest: the XML a restore gets, the save/restore calls on the libvirt
test driver, which profiles are restored, the option, the pool's fallback and the
summary. Real restores are in test_restore.py (VM tier)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from pytest_devbox.config.profiles import BUILTIN_PROFILES
from pytest_devbox.config.resolve import Places, resolve
from pytest_devbox.config.settings import Settings
from pytest_devbox.errors import DomainError
from pytest_devbox.guest.restore import (
    _RESEED_PY,
    PREPARE_SAVE,
    freshen_command,
    restore_xml,
    unrestorable,
)
from pytest_devbox.host.stack import Stack, Virtiofsd
from pytest_devbox.plugin.report import summary_rows
from pytest_devbox.plugin.session import DevboxSession
from pytest_devbox.pool.pool import Pool
from pytest_devbox.virt import domain as dom
from pytest_devbox.virt import domain_xml

P9 = BUILTIN_PROFILES["debian-10"]  # a built-in 9p profile
VIRTIOFS = BUILTIN_PROFILES["debian-12"]


def spec(**kw: object) -> domain_xml.DomainSpec:
    args: dict[str, object] = {
        "name": "devbox-debian-11-9p-s0-01234567",
        "disk": Path("/cache/saves/slot-0/disk.qcow2.partial"),
        "code_dir": Path("/home/dev/first"),
        "share": "9p",
        "accel": "tcg",
        "console_log": Path("/cache/saves/slot-0/build.console.log"),
        "metadata": {"owner_pid": "1", "run_id": "builder"},
        "genid": True,
    }
    args.update(kw)
    return domain_xml.DomainSpec(**args)  # type: ignore[arg-type]


@pytest.fixture
def testconn() -> Iterator[libvirt.virConnect]:
    conn = dom.connect("test:///default")
    yield conn
    conn.close()


def test_genid_only_when_asked() -> None:
    assert ET.fromstring(domain_xml.build_xml(spec())).find("genid") is not None
    assert ET.fromstring(domain_xml.build_xml(spec(genid=False))).find("genid") is None


@pytest.mark.parametrize("share", ["9p", "virtiofs"])
def test_save_and_the_xml_a_restore_gets(
    testconn: libvirt.virConnect, tmp_path: Path, share: str
) -> None:
    ids = "mapped" if share == "9p" else "passthrough"
    d = dom.Domain.create(testconn, spec(share=share, ids=ids), autodestroy=False)
    uuid = d.virdom.UUIDString()
    save = tmp_path / "state.save"
    d.save(save)
    assert d.state() == "shutoff"  # saving stops the guest
    saved = dom.saved_xml(testconn, save)
    new = restore_xml(
        saved,
        disk=tmp_path / "run" / "overlay.qcow2",
        code_dir=Path("/home/dev/second"),
        console_log=tmp_path / "run" / "console.log",
        metadata={"owner_pid": "2", "run_id": "later"},
    )
    root = ET.fromstring(new)
    # What libvirt's ABI check compares stays; what it lets a restore change, changes.
    assert root.findtext("name") == "devbox-debian-11-9p-s0-01234567"
    assert root.findtext("uuid") == uuid
    assert root.findtext("genid") == ET.fromstring(saved).findtext("genid")
    assert root.find("devices/disk/source").get("file") == str(tmp_path / "run/overlay.qcow2")  # type: ignore[union-attr]
    assert root.find("devices/filesystem/source").get("dir") == "/home/dev/second"  # type: ignore[union-attr]
    driver = root.find("devices/filesystem/driver")
    assert (driver is not None and driver.get("type") == "virtiofs") is (share == "virtiofs")
    assert {s.get("path") for s in root.iterfind("devices/*/source[@path]")} == {
        str(tmp_path / "run" / "console.log")
    }
    assert domain_xml.read_metadata(new) == {"owner_pid": "2", "run_id": "later"}
    assert len(root.findall("metadata")) == 1


def test_a_refused_restore_is_a_domain_error(testconn: libvirt.virConnect, tmp_path: Path) -> None:
    d = dom.Domain.create(testconn, spec(), autodestroy=False)
    d.save(tmp_path / "state.save")
    xml = dom.saved_xml(testconn, tmp_path / "state.save")
    # The test driver takes no replacement XML; real libvirt refuses a renamed one alike.
    with pytest.raises(DomainError, match="could not restore devbox-debian-11-9p-s0-01234567"):
        dom.Domain.restore(testconn, tmp_path / "state.save", xml)
    with pytest.raises(DomainError, match="cannot read the save image"):
        dom.saved_xml(testconn, tmp_path / "missing.save")


def test_a_save_without_a_disk_is_not_ours() -> None:
    with pytest.raises(DomainError, match="no disk"):
        restore_xml(
            "<domain><name>x</name></domain>",
            disk=Path("/d"),
            code_dir=Path("/c"),
            console_log=Path("/l"),
            metadata={},
        )


def test_virtiofs_profiles_are_restored_only_where_the_stack_saves_them() -> None:
    assert unrestorable(P9) is None
    why = unrestorable(VIRTIOFS)
    assert why is not None and "virtiofs" in why and '"9p"' in why
    bookworm = Stack((9, 0, 0), (7, 2, 22), Virtiofsd("/usr/lib/qemu/virtiofsd", "c", (7, 2, 22)))
    why = unrestorable(VIRTIOFS, stack=bookworm) or ""
    assert why.startswith("virtiofs guests boot in full: QEMU 7.2.22 (needs >= 8.2.0)")
    assert "QEMU >= 8.2.0, the Rust virtiofsd >= 1.11.0 and libvirt >= 10.5.0" in why
    rust = Virtiofsd("/usr/libexec/virtiofsd", "rust", (1, 13, 2), ("migrate-precopy",))
    assert unrestorable(VIRTIOFS, stack=Stack((11, 3, 0), (10, 0, 13), rust)) is None
    # What a save is prepared with: /code unmounted (and virtiofs's inodes forgotten).
    assert PREPARE_SAVE["virtiofs"].startswith("umount /code && sync && ")
    assert "drop_caches" in PREPARE_SAVE["virtiofs"]


def test_freshen_sets_the_clock_and_reseeds() -> None:
    cmd = freshen_command(now=1795865612.5)
    assert cmd.startswith("date -s @1795865612.500 ")
    compile(_RESEED_PY, "reseed", "exec")  # the guest runs it with python3


@pytest.mark.parametrize(("value", "expected"), [(None, "auto"), ("off", "off"), ("auto", "auto")])
def test_the_restore_option(tmp_path: Path, value: str | None, expected: str) -> None:
    places = Places(tmp_path, tmp_path, tmp_path)
    ini = {"devbox_restore": value} if value else {}
    assert resolve({}, ini.get, places, env={}).settings.restore == expected


def test_a_bad_restore_value_is_a_usage_error(tmp_path: Path) -> None:
    places = Places(tmp_path, tmp_path, tmp_path)
    with pytest.raises(pytest.UsageError, match=r"--devbox-restore='never'.*use auto or off"):
        resolve({"restore": "never"}, lambda _: None, places, env={})


@pytest.mark.parametrize(
    ("profile", "settings", "why"),
    [
        # virtiofs only by the opt-in: by default a Debian guest's /code is 9p (code_ids.py).
        (
            VIRTIOFS,
            {"code_ids": "passthrough"},
            "virtiofs guests boot in full: QEMU 0.0.2 (needs >= 8.2.0)",
        ),
        (P9, {"keep": True}, "--devbox-keep guests are booted"),
    ],
    ids=["virtiofs", "keep"],
)
def test_the_pool_says_once_why_it_boots(
    tmp_path: Path, profile: object, settings: dict[str, object], why: str
) -> None:
    lines: list[str] = []
    s = Settings(uri="test:///default", cache_dir=tmp_path, code_dir=tmp_path, **settings)  # type: ignore[arg-type]
    pool = Pool([profile], s, log=lines.append)  # type: ignore[list-item]
    name = pool.distros[0]
    assert pool._restore(pool.profiles[name], rebuild=False) is None
    assert pool._restore(pool.profiles[name], rebuild=False) is None
    assert len(lines) == 1 and lines[0].startswith(f"{name}: booting instead of restoring: ")
    assert why in lines[0]


def test_restore_off_boots_without_a_word(tmp_path: Path) -> None:
    lines: list[str] = []
    s = Settings(uri="test:///default", cache_dir=tmp_path, code_dir=tmp_path, restore="off")
    pool = Pool([P9], s, log=lines.append)
    assert pool._restore(P9, rebuild=False) is None
    assert lines == []


def test_the_summary_says_how_guests_started(tmp_path: Path) -> None:
    s = Settings(uri="test:///default", cache_dir=tmp_path, code_dir=tmp_path)
    state = DevboxSession(
        s, {p.name: p for p in (P9, VIRTIOFS)}, [P9, VIRTIOFS], accel="tcg", log=print
    )
    pool = state.pool
    pool.stats[P9.name].restores, pool.stats[P9.name].restore_seconds = 3, 2.9
    pool.stats[VIRTIOFS.name].boots, pool.stats[VIRTIOFS.name].boot_seconds = 1, 24.2
    rows = summary_rows(state)
    assert rows[0][:4] == ("distro", "boots", "boot", "restored")
    assert rows[1][:4] == (P9.name, "0", "-", "3 in 2.9 s")
    assert rows[2][:4] == (VIRTIOFS.name, "1", "24.2 s", "-")

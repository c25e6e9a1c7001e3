"""`devbox prune` on a temporary cache of real files (qemu-img images and overlays) and
a temporary libvirt log directory, with a kept guest on libvirt's test:///default driver."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from filelock import FileLock
from seeded_cache import TEST_URI, dead_pid, leftover_run_dir, seed_cache
from test_domain import spec_for

from pytest_devbox.cli import prune
from pytest_devbox.cli.main import main
from pytest_devbox.guest.sweep import claim_run_dir
from pytest_devbox.host.layout import CacheLayout
from pytest_devbox.virt import domain as dom

OLD, OLDER, BUSY, BUILDING = "0" * 16, "1" * 16, "2" * 16, "3" * 16


def _image(layout: CacheLayout, distro: str, key: str) -> Path:
    path = layout.image(distro, key)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    path.with_suffix(".json").write_text(json.dumps({"key": key}))
    return path


def _overlay(base: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(dest)]
    subprocess.run(argv, check=True)
    return dest


@pytest.fixture
def virt() -> Iterator[libvirt.virConnect]:
    """Held for the test: the test driver forgets its domains with its last connection."""
    conn = dom.connect(TEST_URI)
    yield conn
    conn.close()


class Cache:
    """A cache with one of each: what prune must remove, and what it must keep."""

    def __init__(self, root: Path, logs: Path, virt: libvirt.virConnect) -> None:
        layout = CacheLayout(root)
        self.current = seed_cache(root)  # debian-12's current key (local template index)
        old = _image(layout, "debian-12", OLD)
        layout.recipes.mkdir(parents=True, exist_ok=True)
        layout.commands_file("debian-12", OLD).write_text("run-command true\n")
        self.unknown = _image(layout, "nosuch-1", OLDER)  # another project's, maybe
        busy = _image(layout, "debian-12", BUSY)  # old, but a kept guest runs on it
        self.building = _image(layout, "debian-12", BUILDING)  # old, but its lock is held
        live = claim_run_dir(root, "rlive001")
        self.live_overlay = _overlay(self.current, live / "devbox-debian-12-rlive001-aaaa.qcow2")
        dead = leftover_run_dir(root, "rdead001", dead_pid())
        _overlay(self.current, dead / "devbox-debian-12-rdead001-bbbb.qcow2")
        kept_dir = leftover_run_dir(root, "rkept001", dead_pid())
        self.kept_overlay = _overlay(busy, kept_dir / "devbox-debian-12-rkept001-cccc.qcow2")
        self.kept_name = f"devbox-debian-12-{uuid.uuid4().hex[:8]}"
        meta = {"keep": "1", "overlay": str(self.kept_overlay), "distro": "debian-12"}
        spec = spec_for("9p", "tcg", name=self.kept_name, metadata=meta)
        self.domain = dom.Domain.create(virt, spec, autodestroy=False)
        old_save = _overlay(old, layout.save_slot("debian-12", "a" * 16, 0) / "disk.qcow2")
        current_save = _overlay(
            self.current, layout.save_slot("debian-12", "b" * 16, 0) / "disk.qcow2"
        )
        self.current_save = current_save.parent.parent
        logs.mkdir()
        gone = "devbox-debian-12-rdead001-bbbb"
        for name in (f"{gone}.log", f"{gone}-fs0-virtiofsd.log", f"{gone}.log.1"):
            (logs / name).write_text("x" * 5000)
        for name in (f"{self.kept_name}.log", f"{self.kept_name}-fs0-virtiofsd.log", "web.log"):
            (logs / name).write_text("x")  # a running guest's, and not ours
        self.stale = {old, old_save.parent.parent, dead}
        self.stale |= {
            logs / f"{gone}.log",
            logs / f"{gone}-fs0-virtiofsd.log",
            logs / f"{gone}.log.1",
        }
        self.kept = {self.current, busy, self.building, live, kept_dir, self.current_save}
        self.kept.add(self.unknown)
        # (debian-11's key is unknown: the seeded template index has only debian-12.)
        self.kept.add(_image(layout, "debian-11", OLD))
        self.kept |= {logs / f"{self.kept_name}.log", logs / "web.log", self.live_overlay}
        self.kept |= {self.kept_overlay, logs / f"{self.kept_name}-fs0-virtiofsd.log"}
        self.old = old


def _prune(cache: Path, logs: Path, *extra: str) -> None:
    argv = ["prune", "--uri", TEST_URI, "--cache", str(cache), "--offline"]
    assert main([*argv, "--project", str(cache.parent), "--log-dir", str(logs), *extra]) == 0


def test_prune_removes_exactly_what_nothing_uses(
    virt: libvirt.virConnect, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, logs = tmp_path / "cache", tmp_path / "logs"
    c = Cache(root, logs, virt)
    with FileLock(str(c.building) + ".lock"):  # an image being built
        before = {p: p.stat().st_size for p in root.rglob("*") if p.is_file()}
        _prune(root, logs, "--dry-run")
        listed = capsys.readouterr().out
        assert {p: p.stat().st_size for p in root.rglob("*") if p.is_file()} == before
        assert all(p.exists() for p in c.stale)  # a dry run removes nothing...
        for path in c.stale:  # ...and lists each, with its size
            assert any(str(path) in line and " MB " in line for line in listed.splitlines())
        for path in c.kept:
            assert str(path) + " " not in listed, path
        assert "would remove " in listed and "dry run: nothing removed" in listed
        _prune(root, logs)
        out, err = capsys.readouterr()
        assert f"keeping {c.building}: in use (its lock is held)" in err
        assert "keeping every image of nosuch-1: no profile of this project" in err
    assert not [p for p in c.stale if p.exists()]
    assert all(p.exists() for p in c.kept)
    assert not c.old.with_suffix(".json").exists()
    assert not CacheLayout(root).commands_file("debian-12", OLD).exists()
    # The old image, its metadata and commands file; the save's disk; the dead run
    # dir's owner file and two overlays; three logs.
    assert out.splitlines()[-1].startswith("removed 10 files, "), out
    _prune(root, logs)  # the build is over (its lock free): that image goes now
    assert str(c.building) in capsys.readouterr().out and not c.building.exists()
    assert c.unknown.exists()
    _prune(root, logs, "--unknown")  # asked for: images of distros nothing here names
    assert str(c.unknown) in capsys.readouterr().out and not c.unknown.exists()
    _prune(root, logs)
    assert capsys.readouterr().out.strip() == "removed 0 files, 0.0 MB freed"
    c.domain.destroy()


def test_the_log_dir_of_each_uri() -> None:
    assert prune.libvirt_log_dir("qemu:///system") == Path("/var/log/libvirt/qemu")
    assert str(prune.libvirt_log_dir("qemu:///session")).endswith("libvirt/qemu/log")
    assert prune.libvirt_log_dir(TEST_URI) is None  # nothing removed where we cannot tell

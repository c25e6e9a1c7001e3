"""The saved-state cache (restore slots): keys, leases, atomic install, pruning.

No guest here: a slot's files are written by a stand-in `build`; leases are real file
locks, held across processes as they are between sessions.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_devbox.guest.slots import SaveCache, Slot, save_key

KEY = "0123456789abcdef"


def fill(path_state: Path, path_disk: Path) -> None:
    path_state.write_bytes(b"state" * 100)
    path_disk.write_bytes(b"disk")


def test_save_key_follows_what_a_save_depends_on(tmp_path: Path) -> None:
    base = {
        "cache_root": tmp_path,
        "image_key": "aaaa",
        "image_built_at": "2026-11-28T11:13:00+00:00",
        "domain_xml": "<domain/>",
        "libvirt_version": 9000000,
        "qemu_version": 7002022,
        "host": '{"cpu": "a"}',
        "cache_id": "abcdef",
    }
    key = save_key(**base)  # type: ignore[arg-type]
    assert len(key) == 16 and key == save_key(**base)  # type: ignore[arg-type]
    changes = {
        "image_built_at": "2026-11-29T00:00:00+00:00",  # --devbox-rebuild: same image key
        "domain_xml": "<domain type='kvm'/>",
        "qemu_version": 8002000,
        "libvirt_version": 10000000,
        "cache_root": tmp_path / "other",
        "host": '{"cpu": "b"}',  # another CPU, microcode or host kernel
        "cache_id": "012345",
    }
    for field, value in changes.items():
        assert save_key(**{**base, field: value}) != key, field  # type: ignore[arg-type]


def test_slot_names_are_libvirt_names_of_their_own(tmp_path: Path) -> None:
    saves = SaveCache(tmp_path)
    names = [s.name for s in saves.slots("debian-11-9p", KEY)]
    cache_id = saves.cache_id()
    assert names[0] == f"devbox-debian-11-9p-s0-{cache_id}-01234567"
    # Made once and kept in the cache; another cache has another id.
    assert SaveCache(tmp_path).cache_id() == cache_id
    assert SaveCache(tmp_path / "other").cache_id() != cache_id
    assert len(set(names)) == saves.max_slots


def test_leases_hand_out_distinct_slots_and_run_out(tmp_path: Path) -> None:
    saves = SaveCache(tmp_path, max_slots=2)
    first = saves.lease("d", KEY)
    second = saves.lease("d", KEY)
    assert first is not None and second is not None
    assert first.slot.index != second.slot.index
    assert saves.lease("d", KEY) is None
    second.release()
    third = saves.lease("d", KEY)
    assert third is not None and third.slot.index == second.slot.index


def test_a_valid_slot_is_leased_before_an_empty_one(tmp_path: Path) -> None:
    saves = SaveCache(tmp_path, max_slots=3)
    lease = saves.lease("d", KEY)
    assert lease is not None
    held = saves.lease("d", KEY)  # slot 1, so that slot 2 gets filled below
    assert held is not None and held.slot.index == 1
    spare = saves.lease("d", KEY)
    assert spare is not None and spare.slot.index == 2
    saves.install(spare, fill)
    spare.release()
    lease.release()
    again = saves.lease("d", KEY)
    assert again is not None and again.slot.index == 2 and saves.valid(again.slot)


def test_install_is_atomic_and_meta_comes_last(tmp_path: Path) -> None:
    saves = SaveCache(tmp_path)
    lease = saves.lease("d", KEY)
    assert lease is not None
    slot = lease.slot

    def broken(state: Path, disk: Path) -> None:
        fill(state, disk)
        raise KeyboardInterrupt  # Ctrl-C in the middle of a save

    with pytest.raises(KeyboardInterrupt):
        saves.install(lease, broken)
    assert not saves.valid(slot)
    assert sorted(p.name for p in slot.dir.iterdir()) == ["lease.lock"]
    saves.install(lease, fill)
    assert saves.valid(slot)
    assert json.loads(slot.meta.read_text())["name"] == slot.name


@pytest.mark.parametrize("damage", ["truncated state", "no disk", "other key"])
def test_a_damaged_slot_is_not_valid(tmp_path: Path, damage: str) -> None:
    saves = SaveCache(tmp_path)
    lease = saves.lease("d", KEY)
    assert lease is not None
    saves.install(lease, fill)
    slot = lease.slot
    if damage == "truncated state":
        slot.state.write_bytes(b"st")
    elif damage == "no disk":
        slot.disk.unlink()
    else:
        other = Slot(slot.distro, "f" * 16, slot.index, slot.dir)
        assert not saves.valid(other)
        return
    assert not saves.valid(slot)


HOLD = """
import sys, time
from pathlib import Path
from pytest_devbox.guest.slots import SaveCache
lease = SaveCache(Path(sys.argv[1]), max_slots=1).lease("d", sys.argv[2])
print("held" if lease else "none", flush=True)
time.sleep(600)
"""


def test_a_lease_ends_with_its_process(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path), KEY], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        saves = SaveCache(tmp_path, max_slots=1)
        assert saves.lease("d", KEY) is None
        proc.kill()  # kill -9: no cleanup code runs
        proc.wait()
        deadline = time.monotonic() + 5
        while (lease := saves.lease("d", KEY)) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert lease is not None
    finally:
        proc.kill()
        proc.wait()


def test_prune_removes_saves_of_other_keys_nobody_holds(tmp_path: Path) -> None:
    saves = SaveCache(tmp_path, max_slots=1)
    old, held, current = "a" * 16, "b" * 16, KEY
    leases = {}
    for key in (old, held, current):
        lease = leases[key] = saves.lease("d", key)
        assert lease is not None
        saves.install(lease, fill)
        if key != held:
            lease.release()
    # Another profile whose name starts like this one is not ours to prune.
    lookalike = saves.lease("d-9p", old)
    assert lookalike is not None
    lookalike.release()
    removed = saves.prune("d", current)
    layout = saves.layout
    assert removed == [layout.save_dir("d", old)]
    assert layout.save_dir("d", held).is_dir()
    assert layout.save_dir("d", current).is_dir()
    assert layout.save_dir("d-9p", old).is_dir()
    leases[held].release()  # held until here: a guest of that save still runs

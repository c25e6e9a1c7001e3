"""Artifacts of a failed test never end the session (findings 7 and 26 of the 2026-12
review): a short, distinct directory per node id, and a file that cannot be written
(here a real ENOSPC from /dev/full) is a warning line, not an OSError."""

from __future__ import annotations

import os
from pathlib import Path

from pytest_devbox.plugin.forensics import COMMANDS, artifacts_dir_for, collect

LONG_ID = "tests/test_x.py::test_many[" + "debian-12-" + "x" * 330 + "]"


def test_finding7_a_long_parametrized_id_gets_a_directory_that_can_be_made(
    tmp_path: Path,
) -> None:
    """Before: the whole id (363 chars) was one file name: ENAMETOOLONG from mkdir."""
    d = artifacts_dir_for(tmp_path, LONG_ID)
    assert d.parent == tmp_path and len(d.name.encode()) < 255
    assert d.name.startswith("tests_test_x.py_test_many_debian-12-x")
    d.mkdir()


def test_finding26_ids_that_clean_to_one_name_get_different_dirs(tmp_path: Path) -> None:
    """Before: test_x[a/b] and test_x[a_b] were both tests_t.py_test_x_a_b."""
    one = artifacts_dir_for(tmp_path, "tests/t.py::test_x[a/b]")
    other = artifacts_dir_for(tmp_path, "tests/t.py::test_x[a_b]")
    assert one != other
    assert one.name.startswith("tests_t.py_test_x_a_b-")
    assert artifacts_dir_for(tmp_path, "tests/t.py::test_x[a/b]") == one  # stable


class StoppedGuest:
    """What collect reads of a Machine, for a guest that has already stopped (the fast
    tier runs no guest; the commands are then not run, as for a real stopped one)."""

    name = "devbox-debian-12-r1-0001"
    remote = None
    closed = True

    def __init__(self, console_log: Path) -> None:
        self.console_log = console_log


def test_finding7_collect_turns_a_full_disk_into_warning_lines(tmp_path: Path) -> None:
    """Before: the OSError of path.write_text escaped into pytest_runtest_makereport
    (INTERNALERROR: the session ended)."""
    console = tmp_path / "console.log"
    console.write_text("boot\n")
    guest = StoppedGuest(console)
    where = tmp_path / "artifacts" / guest.name
    where.mkdir(parents=True)
    for name in ("journal.txt", "dmesg.txt"):
        os.symlink("/dev/full", where / name)  # every write there: ENOSPC
    files, problems = collect([guest], tmp_path / "artifacts")  # type: ignore[list-item]
    assert sorted(p.name for p in files) == sorted({"console.log", *COMMANDS} - {
        "journal.txt", "dmesg.txt"})  # fmt: skip
    assert (where / "console.log").read_text() == "boot\n"
    assert len(problems) == 2 and all("No space left on device" in p for p in problems)


def test_finding7_collect_where_no_directory_can_be_made(tmp_path: Path) -> None:
    (tmp_path / "artifacts").write_text("a file, not a directory")
    files, problems = collect(
        [StoppedGuest(tmp_path / "none.log")],  # type: ignore[list-item]
        tmp_path / "artifacts" / "t",
    )
    assert files == [] and len(problems) == 1 and "could not save" in problems[0]

"""share = "sync" on a real guest: debian-12's own image (made for virtiofs) started with
the share overridden, shared by every test here (one boot), and one pytest run of a
tiny project with --devbox-share=sync."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from guests import GUEST_UID

from pytest_devbox.guest.machine import Machine
from pytest_devbox.guest.sync_files import list_files
from pytest_devbox.host.layout import default_cache_dir

pytestmark = pytest.mark.vm
REAL_CACHE = default_cache_dir()
# name, size, mode (octal), owner's uid: what /code must hold for each listed file.
FIND = "find . -mindepth 1 ! -type d -printf '%P %s %m %U\\n' | sort"


def guest_files(m: Machine) -> list[str]:
    return m.run(FIND).stdout.splitlines()


def host_files(code_dir: Path) -> list[str]:
    lines = []
    for name, (size, _mtime, mode) in list_files(code_dir).files.items():
        perm = mode & 0o7777 if not os.path.islink(code_dir / name) else 0o777
        lines.append(f"{name} {size} {perm:o} {GUEST_UID}")
    return sorted(lines)


def test_code_is_a_copy_of_the_host_list_owned_by_the_guest_user(
    debian12_sync: Machine, sync_code_dir: Path
) -> None:
    m = debian12_sync
    assert m.share == "sync"
    assert guest_files(m) == host_files(sync_code_dir)
    if shutil.which("git"):
        assert m.run("test -e debug.log", check=False).failed  # .gitignore'd
    assert m.run("stat -c %u /code").stdout.strip() == str(GUEST_UID)
    assert m.run("readlink link").stdout == "src/app.py\n"
    assert m.run("./run.sh").stdout == "ran\n"  # the mode came along
    # mtimes to the second at least (make compares them): stat %Y in the guest.
    host_mtime = int((sync_code_dir / "src" / "app.py").stat().st_mtime)
    assert m.run("stat -c %Y src/app.py").stdout.strip() == str(host_mtime)


def test_code_is_not_a_mount_and_the_boot_did_not_wait_for_one(debian12_sync: Machine) -> None:
    m = debian12_sync
    assert m.run("mountpoint -q /code", check=False).failed
    assert m.run("findmnt /code", check=False).stdout == ""
    # The image is debian-12's own: its fstab still names a virtiofs /code, with nofail,
    # so the boot went on without it (the mount unit failed, nothing waited for it).
    assert "/code virtiofs defaults,nofail" in m.run("cat /etc/fstab").stdout
    failed = m.run("systemctl is-failed code.mount", check=False, user="root")
    assert failed.stdout.strip() == "failed"
    chain = m.run("systemd-analyze critical-chain multi-user.target", user="root").stdout
    assert "code.mount" not in chain


def test_host_changes_arrive_with_sync_and_not_before(
    debian12_sync: Machine, sync_code_dir: Path
) -> None:
    m = debian12_sync
    (sync_code_dir / "changing.txt").write_text("one\n")
    (sync_code_dir / "going.txt").write_text("bye\n")
    m.sync()
    m.run("echo guest > made-in-guest.txt")  # the guest's own file: never removed
    (sync_code_dir / "changing.txt").write_text("two, longer\n")
    (sync_code_dir / "going.txt").unlink()
    (sync_code_dir / "new" / "deep").mkdir(parents=True)
    (sync_code_dir / "new" / "deep" / "added.txt").write_text("added\n")
    before = m.run("cat changing.txt; test -e going.txt && echo going; test -e new || echo -")
    assert before.stdout == "one\ngoing\n-\n"

    summary = m.sync()

    assert (summary.files_sent, summary.files_removed) == (2, 1)
    assert summary.bytes_sent == len("two, longer\n") + len("added\n")
    assert m.run("cat changing.txt new/deep/added.txt").stdout == "two, longer\nadded\n"
    assert m.run("test -e going.txt", check=False).failed
    assert m.run("cat made-in-guest.txt").stdout == "guest\n"
    assert guest_files(m) == sorted(
        [*host_files(sync_code_dir), f"made-in-guest.txt 6 644 {GUEST_UID}"]
    )
    assert m.sync().files_sent == 0  # nothing changed: nothing sent


def test_a_removed_directory_goes_unless_the_guest_wrote_into_it(
    debian12_sync: Machine, sync_code_dir: Path
) -> None:
    m = debian12_sync
    for d in ("empty-after", "guest-wrote"):
        (sync_code_dir / d / "sub").mkdir(parents=True)
        (sync_code_dir / d / "sub" / "f").write_text("x")
    m.sync()
    m.run("echo mine > guest-wrote/mine")
    shutil.rmtree(sync_code_dir / "empty-after")
    shutil.rmtree(sync_code_dir / "guest-wrote")
    assert m.sync().files_removed == 2
    assert m.run("test -e empty-after", check=False).failed
    assert m.run("ls -A guest-wrote").stdout == "mine\n"


@pytest.mark.host_tier
def test_a_pytest_run_with_share_sync(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_code_is_copied(devbox):
            assert devbox.share == "sync"
            assert devbox.run("cat data.txt").stdout == "from the host\\n"
            assert devbox.run("mountpoint -q /code", check=False).failed

        def test_sync_brings_a_new_file(devbox, request):
            (request.config.rootpath / "later.txt").write_text("later\\n")
            assert devbox.run("test -e later.txt", check=False).failed
            assert devbox.sync().files_sent >= 1
            assert devbox.run("cat later.txt").stdout == "later\\n"
        """
    )
    (pytester.path / "data.txt").write_text("from the host\n")
    result = pytester.runpytest_subprocess(
        "--devbox=debian-12", "--devbox-share=sync", "--devbox-offline",
        f"--devbox-cache={REAL_CACHE}", "-p", "no:cacheprovider", "-s",
    )  # fmt: skip
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            # Restored from a save slot (made once per image), then copied in full.
            "*debian-12: synced * to /code (every file): * files sent*",
            "*debian-12: restored in * s (*, sync /code)*",
        ]
    )

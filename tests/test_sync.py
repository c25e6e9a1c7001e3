"""share = "sync" on the host side: the file list (real git), the manifest diff, the tar
stream (extracted by real tar), the option and the profile field, the recipe and XML."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from local_sshd import HAVE_SSHD, client_files, host_key, run_sshd, username

from pytest_devbox.config.profiles import BUILTIN_PROFILES, effective_share, load_profiles
from pytest_devbox.config.resolve import Places, resolve
from pytest_devbox.guest.restore import unrestorable
from pytest_devbox.guest.sync import CodeSync, SyncSummary, extract_command, write_tar
from pytest_devbox.guest.sync_files import Excludes, diff, list_files
from pytest_devbox.image import recipe
from pytest_devbox.transport.ssh import Connection
from pytest_devbox.virt.domain_xml import DomainSpec, build_xml

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
USER = ("devbox", 1000, 1000)


def git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo), *args],
        check=True,
        capture_output=True,
    )


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git work tree: tracked, ignored (top and nested .gitignore), untracked files,
    and one tracked file deleted in the work tree."""
    r = tmp_path / "repo"
    write(
        r,
        {
            ".gitignore": "*.log\n/build/\n",
            "src/.gitignore": "generated.py\n",
            "src/app.py": "print(1)\n",
            "src/generated.py": "x = 1\n",
            "src/sub/generated.py": "x = 2\n",
            "docs/readme.md": "hi\n",
            "gone.txt": "tracked, then deleted\n",
            "build/out.o": "obj\n",
            "src/build/kept.txt": "not top-level build/\n",
            "debug.log": "log\n",
        },
    )
    git(r, "init", "-q")
    git(r, "add", ".gitignore", "src/.gitignore", "src/app.py", "docs", "gone.txt")
    git(r, "add", "-f", "src/build/kept.txt")
    git(r, "commit", "-qm", "init")
    (r / "gone.txt").unlink()
    write(r, {"untracked.txt": "new\n", "src/new.py": "new\n"})
    return r


@needs_git
def test_a_git_work_tree_lists_what_git_shows(repo: Path) -> None:
    listed = list_files(repo)
    assert listed.source == "git"
    assert sorted(listed.files) == [
        ".gitignore",
        "docs/readme.md",
        "src/.gitignore",
        "src/app.py",
        "src/build/kept.txt",
        "src/new.py",
        "untracked.txt",
    ]  # no *.log, /build/, nested-ignored generated.py, deleted gone.txt, nor .git


@needs_git
def test_a_subdirectory_of_a_work_tree_lists_relative_to_itself(repo: Path) -> None:
    assert sorted(list_files(repo / "src").files) == [
        ".gitignore",
        "app.py",
        "build/kept.txt",
        "new.py",
    ]


@needs_git
def test_excludes_apply_on_top_of_git(repo: Path) -> None:
    listed = list_files(repo, ["docs/", "*.py", "!src/new.py", "/untracked.txt"])
    assert sorted(listed.files) == [
        ".gitignore",
        "src/.gitignore",
        "src/build/kept.txt",
        "src/new.py",
    ]


def test_without_git_every_file_is_walked_excludes_prune(tmp_path: Path) -> None:
    write(
        tmp_path, {"a.txt": "", "node_modules/x/y.js": "", "deep/node_modules/z": "", "b/c.o": ""}
    )
    (tmp_path / ".git").mkdir()  # not a repository: a plain directory like any other
    (tmp_path / ".git" / "HEAD").write_text("")
    os.symlink("b", tmp_path / "link-to-dir")
    listed = list_files(tmp_path, ["node_modules", "*.o"], git=lambda _: None)
    assert listed.source == "walk"
    assert sorted(listed.files) == [".git/HEAD", "a.txt", "link-to-dir"]


@pytest.mark.parametrize(
    ("patterns", "path", "excluded"),
    [
        (["*.pyc"], "a/b/c.pyc", True),
        (["/top.txt"], "a/top.txt", False),
        (["/top.txt"], "top.txt", True),
        (["build/"], "x/build/f", True),
        (["build/"], "x/build", False),  # a file named build: dir-only pattern
        (["a/**/z"], "a/z", True),
        (["a/**/z"], "a/b/c/z", True),
        (["dir", "!dir/keep"], "dir/keep", True),  # no way back under an excluded dir
        (["*.txt", "!keep.txt"], "d/keep.txt", False),
        (["f[0-9].txt"], "f7.txt", True),
        (["f[!0-9].txt"], "f7.txt", False),
        (["# comment", "", "\\#hash"], "#hash", True),
    ],
)
def test_exclude_patterns_follow_gitignore(patterns: list[str], path: str, excluded: bool) -> None:
    assert Excludes(patterns).excluded(path) is excluded


def test_the_diff_sends_new_and_changed_and_removes_only_what_was_synced() -> None:
    previous = {"same": (1, 10, 0o100644), "edited": (1, 10, 0o100644), "gone": (1, 1, 0o100644)}
    current = {
        "same": (1, 10, 0o100644),
        "edited": (1, 11, 0o100644),
        "new": (3, 1, 0o100644),
    }
    changes = diff(previous, current)
    assert changes.send == ["edited", "new"] and changes.remove == ["gone"]
    assert diff(current, current).empty
    chmod = {**current, "same": (1, 10, 0o100755)}
    assert diff(current, chmod).send == ["same"]  # a mode change alone is sent


def test_the_tar_stream_extracts_to_the_same_files(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    write(src, {"a/b.txt": "bee\n", "run.sh": "#!/bin/sh\n", "big.bin": ""})
    (src / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 7))
    os.chmod(src / "run.sh", 0o750)
    os.utime(src / "a/b.txt", ns=(1_600_000_000_123_456_789,) * 2)
    os.symlink("a/b.txt", src / "link")
    os.symlink("/nonexistent", src / "dangling")
    listed = list_files(src, git=lambda _: None)
    out = io.BytesIO()
    sent, size, vanished = write_tar(out, src, sorted(listed.files), listed.files)
    assert (sent, vanished) == (5, set())
    assert size == 3 * 1024 * 1024 + 7 + 4 + 10
    dst.mkdir()
    subprocess.run(["tar", "-x", "-p", "-f", "-", "-C", str(dst)], input=out.getvalue(), check=True)
    again = list_files(dst, git=lambda _: None)
    # Same names, sizes, mtimes (to the nanosecond) and modes: nothing to send again.
    assert diff(listed.files, again.files).empty
    assert (dst / "big.bin").read_bytes() == (src / "big.bin").read_bytes()
    assert (
        os.readlink(dst / "link") == "a/b.txt" and os.readlink(dst / "dangling") == "/nonexistent"
    )


@pytest.mark.parametrize("tool", ["tar", "python3"])
def test_the_guest_command_extracts_with_tar_or_else_python(tmp_path: Path, tool: str) -> None:
    """extract_command, run by a real sh whose PATH offers only `tool` (as in a guest
    without tar): the same files, modes, mtimes and links come out."""
    src, dst, bin_dir = tmp_path / "src", tmp_path / "dst dir", tmp_path / "bin"
    write(src, {"a/b.txt": "bee\n", "x.sh": "#!/bin/sh\n"})
    os.chmod(src / "x.sh", 0o700)
    os.symlink("/elsewhere", src / "abs-link")
    os.utime(src / "a/b.txt", ns=(1_600_000_000_987_654_321,) * 2)
    listed = list_files(src, git=lambda _: None)
    out = io.BytesIO()
    write_tar(out, src, sorted(listed.files), listed.files)
    bin_dir.mkdir()
    real = sys.executable if tool == "python3" else shutil.which(tool)  # not a pyenv shim
    assert real is not None
    os.symlink(real, bin_dir / tool)
    dst.mkdir()
    sh = shutil.which("sh") or "/bin/sh"
    subprocess.run(
        [sh, "-c", extract_command(str(dst))],
        input=out.getvalue(),
        env={"PATH": str(bin_dir)},
        check=True,
    )
    again = list_files(dst, git=lambda _: None).files
    if tool == "tar":
        assert again == listed.files  # to the nanosecond
        return
    # Python's tarfile sets mtimes from a float (to about a microsecond), and not on links.
    assert {p: (s[0], s[2]) for p, s in again.items()} == {
        p: (s[0], s[2]) for p, s in listed.files.items()
    }
    for name in ("a/b.txt", "x.sh"):
        assert abs(again[name][1] - listed.files[name][1]) < 1000


def test_a_file_gone_since_listing_is_left_out_of_the_stream(tmp_path: Path) -> None:
    write(tmp_path / "src", {"stays": "1", "goes": "2"})
    listed = list_files(tmp_path / "src", git=lambda _: None)
    (tmp_path / "src" / "goes").unlink()
    out = io.BytesIO()
    sent, _, vanished = write_tar(out, tmp_path / "src", sorted(listed.files), listed.files)
    assert (sent, vanished) == (1, {"goes"})
    names = subprocess.run(["tar", "-t"], input=out.getvalue(), capture_output=True, check=True)
    assert names.stdout.split() == [b"stays"]


def test_summary_reads_as_one_line() -> None:
    assert str(SyncSummary(3, 2048, 1, 0.25)) == "3 files sent (2.0 KiB), 1 removed in 0.2 s"


# --- the option, the profile field, the image and the guest's XML ---------------------


@pytest.fixture
def places(tmp_path: Path) -> Places:
    return Places(cwd=tmp_path, ini_dir=tmp_path, rootdir=tmp_path)


def reader(values: dict[str, Any]) -> Any:
    return lambda name: values.get(name)


def test_share_override_and_excludes_resolve(places: Places) -> None:
    ini = {"devbox_share": "9p", "devbox_sync_exclude": ["*.o", "build/"]}
    s = resolve({"share": "sync"}, reader(ini), places, env={}).settings
    assert (s.share, s.sync_exclude) == ("sync", ("*.o", "build/"))
    assert resolve({}, reader({}), places, env={}).settings.share == ""  # each profile's own


def test_an_unknown_share_is_a_usage_error_before_any_guest(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(devbox): pass")
    result = pytester.runpytest("--devbox=debian-12", "--devbox-share=nfs")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*--devbox-share='nfs': unknown share 'nfs': use virtiofs, 9p or sync*"]
    )


def test_the_override_keeps_the_profiles_image() -> None:
    p = BUILTIN_PROFILES["debian-12"]
    assert effective_share(p) == "virtiofs" and effective_share(p, "sync") == "sync"
    assert unrestorable(p) is not None and unrestorable(p, "sync") is None


def test_a_profile_may_declare_sync(tmp_path: Path) -> None:
    (tmp_path / "devbox.toml").write_text(
        textwrap.dedent(
            """
            [distros.d12-sync]
            extends = "debian-12"
            share = "sync"
            """
        )
    )
    p = load_profiles(tmp_path)["d12-sync"]
    assert p.share == "sync"
    lines = recipe.commands(p, USER, Path("/k.pub"))
    # No /code line in fstab (an inherited one neither); /code is the guest user's.
    assert not [c for c in lines if recipe.code_mount_type(c)] and "mkdir /code" in lines
    assert lines.index("run-command chown devbox: /code") > lines.index("mkdir /code")
    shared = recipe.commands(replace(p, share="virtiofs"), USER, Path("/k.pub"))
    assert "run-command chown devbox: /code" not in shared


def test_a_sync_guest_has_no_filesystem_device() -> None:
    spec = DomainSpec(
        name="devbox-x", disk=Path("/d.qcow2"), code_dir=Path("/c"), share="sync",
        accel="tcg", console_log=Path("/c.log"),
    )  # fmt: skip
    xml = build_xml(spec)
    assert "<filesystem" not in xml and "memoryBacking" not in xml
    assert "<filesystem" in build_xml(replace(spec, share="9p"))


# --- CodeSync against a local sshd standing for the guest ------------------------------

needs_sshd = pytest.mark.skipif(not HAVE_SSHD, reason="needs OpenSSH's sshd and ssh-keygen")


class _DeletesOnSend(Connection):
    """A real connection to the local sshd; when armed, the file `doomed` is deleted
    on the host right as the tar stream starts: listed by the sync, gone when read."""

    doomed: Path | None = None

    def open_session(self) -> Any:
        if self.doomed is not None:
            self.doomed.unlink()
            self.doomed = None
        return super().open_session()


@needs_sshd
def test_finding_12_a_file_deleted_during_a_sync_is_removed_by_the_next(tmp_path: Path) -> None:
    key, authorized = client_files(tmp_path / "client")
    code, guest = tmp_path / "code", tmp_path / "guest code"
    write(code, {"old_module.py": "v1\n", "keep.py": "k\n"})
    guest.mkdir()
    with run_sshd(tmp_path / "sshd", authorized, host_key(tmp_path / "hk")) as sshd:
        conn = _DeletesOnSend(
            "127.0.0.1",
            sshd.port,
            username=username(),
            key_path=key,
            known_hosts=tmp_path / "known_hosts",
            host_key_alias="sync-guest",
        )
        conn.connect(timeout=10)
        code_sync = CodeSync(
            code,
            (),
            user=lambda: conn,
            root=None,
            label="stand-in",
            log=lambda _: None,
            target=str(guest),
            manifest=str(tmp_path / "manifest.json"),
        )
        try:
            code_sync.sync()
            assert (guest / "old_module.py").read_text() == "v1\n"
            (code / "old_module.py").write_text("v2, then deleted\n")
            os.utime(code / "old_module.py", ns=(1_700_000_000_000_000_000,) * 2)
            conn.doomed = code / "old_module.py"
            code_sync.sync()  # lists it (changed), finds it gone when sending
            assert conn.doomed is None
            code_sync.sync()
            assert sorted(os.listdir(guest)) == ["keep.py"]  # the stale copy went
        finally:
            conn.close()

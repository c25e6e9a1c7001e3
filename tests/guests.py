"""Real guests shared by every VM-tier test module: one debian-12 (a virtiofs profile,
shared over 9p in mapped mode by default: config/code_ids.py), one
debian-11 (9p, through a user profile) and one debian-12 with its share overridden to
"sync" (/code a copy of `sync_code_dir`), booted once per test session on first use.

Booting under software emulation costs 20-30 s; sharing keeps the VM tier short.
Tests that need a guest of their own start one with `start_machine`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_devbox.config.profiles import BUILTIN_PROFILES, Profile, load_profiles
from pytest_devbox.guest.machine import Machine
from pytest_devbox.host.layout import default_cache_dir
from pytest_devbox.host.probes import resolve_accel
from pytest_devbox.image.cache import ImageCache

CACHE = default_cache_dir()
URI = "qemu:///system"
# As root, give the guest user another uid than ours, so ownership checks mean something.
GUEST_UID = 4242 if os.geteuid() == 0 else os.getuid()
GUEST_GID = 4242 if os.geteuid() == 0 else os.getgid()


def start_machine(profile: Profile, cache: ImageCache, code_dir: Path, share: str = "") -> Machine:
    return Machine.start(profile, cache=cache, code_dir=code_dir, uri=URI, share=share)


@pytest.fixture(scope="session")
def cache() -> ImageCache:
    return ImageCache(
        CACHE,
        public_index=False,
        tcg=resolve_accel() == "tcg",
        guest_user=("devbox", GUEST_UID, GUEST_GID),
    )


@pytest.fixture(scope="session")
def code_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("code")
    (d / "from-host.txt").write_text("written on the host\n")
    if os.geteuid() == 0:
        os.chown(d, GUEST_UID, GUEST_GID)
    return d


@pytest.fixture(scope="session")
def debian12(cache: ImageCache, code_dir: Path) -> Iterator[Machine]:
    with start_machine(BUILTIN_PROFILES["debian-12"], cache, code_dir) as m:
        yield m


@pytest.fixture(scope="session")
def debian11_9p(
    cache: ImageCache, code_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Machine]:
    project = tmp_path_factory.mktemp("project")
    (project / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [tool.pytest-devbox.distros.debian-11-9p]
            extends = "debian-11"
            share = "9p"
            """
        )
    )
    profile = load_profiles(project)["debian-11-9p"]
    with start_machine(profile, cache, code_dir) as m:
        yield m


@pytest.fixture(scope="session")
def sync_code_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The code dir of `debian12_sync`: a git work tree, so git's file list is used."""
    d = tmp_path_factory.mktemp("sync-code")
    (d / "src").mkdir()
    (d / "src" / "app.py").write_text("print('hello')\n")
    (d / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (d / "run.sh").chmod(0o750)
    (d / "link").symlink_to("src/app.py")
    (d / ".gitignore").write_text("*.log\n")
    (d / "debug.log").write_text("ignored by git: never copied\n")
    if shutil.which("git"):  # else every file is walked, and debug.log is copied too
        subprocess.run(["git", "init", "-q", str(d)], check=True)
    return d


@pytest.fixture(scope="session")
def debian12_sync(cache: ImageCache, sync_code_dir: Path) -> Iterator[Machine]:
    """debian-12's own image (made for virtiofs) started with share "sync"."""
    with start_machine(BUILTIN_PROFILES["debian-12"], cache, sync_code_dir, share="sync") as m:
        yield m

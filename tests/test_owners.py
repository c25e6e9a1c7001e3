"""Whose guests, records, images and cache the `devbox` command acts on (review
2026-12-defects.md, findings 2, 3, 4, 22, 23 and 25).

Kept guests are domains of libvirt's test driver with a kept record in a temporary
cache: on test:///default when one process suffices, else in a test driver file
(test:///PATH, read afresh by every connection) so that a `devbox` subprocess, and one
run as `nobody` through setpriv, sees them too. Their SSH port is a real local sshd that
admits the cache's key; its log says which user each login asked for. Two temporary
project dirs stand for two projects of one user.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from local_sshd import HAVE_SSHD

from pytest_devbox.cli.main import main
from pytest_devbox.config.resolve import Places, resolve

TEST_URI = "test:///default"
ALIAS = "devbox-debian-12-0123456789abcdef-20261201T000000"
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
needs_sshd = pytest.mark.skipif(not HAVE_SSHD, reason="needs OpenSSH's sshd and ssh-keygen")


def project(path: Path) -> Path:
    """A project dir of its own (its pytest.ini makes it the rootdir)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "pytest.ini").write_text("[pytest]\n")
    return path


def devbox(
    *argv: str, cwd: Path | None = None, user: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The `devbox` command in a process of its own (`devbox ssh` execs ssh)."""
    cmd = [*(user or []), sys.executable, "-m", "pytest_devbox.cli", *argv]
    return subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120
    )


def test_finding22_the_cache_is_made_0700_and_refused_when_not_ours(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh" / "cache"
    assert main(["ls", "--uri", TEST_URI, "--cache", str(fresh)]) == 0
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700  # not 0755 from the umask
    # Another user plants the cache dir first (a shared /tmp, $PYTEST_DEVBOX_CACHE).
    shared = Path(tempfile_dir(tmp_path))
    planted = shared / "devbox"
    subprocess.run([*NOBODY, "mkdir", str(planted)], check=True)
    r = devbox("ls", "--uri", TEST_URI, "--cache", str(planted))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"{planted} belongs to uid 65534, not to you: use a cache of your own" in r.stderr
    assert "(--cache DIR or $PYTEST_DEVBOX_CACHE)" in r.stderr
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o775)
    r = devbox("ls", "--uri", TEST_URI, "--cache", str(loose))
    assert r.returncode == 2 and f"`chmod go-w {loose}`" in r.stderr, r.stderr
    # The plugin refuses it too, for a session that selects distros; one that selects
    # none never touches the cache.
    places = Places(cwd=tmp_path, ini_dir=tmp_path, rootdir=tmp_path)
    with pytest.raises(pytest.UsageError, match="is writable by others"):
        resolve({"cache_dir": str(loose), "distros": "debian-12"}, lambda _: None, places, env={})
    assert resolve({"cache_dir": str(loose)}, lambda _: None, places, env={}).distros == []
    # doctor reports it rather than refusing to run.
    r = devbox("doctor", "--uri", TEST_URI, "--cache", str(loose))
    assert "[FAIL] cache" in r.stdout and "writable by others" in r.stdout


def tempfile_dir(tmp_path: Path) -> str:
    """A directory like /tmp that another user can reach (tmp_path is root's only)."""
    import tempfile

    path = tempfile.mkdtemp(prefix="devbox-owners-")
    os.chmod(path, 0o1777)  # like /tmp
    return path


def test_finding22_filelock_floor_excludes_cve_2025_68146() -> None:
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    assert re.findall(r'"filelock\b[^"]*"', pyproject) == ['"filelock>=3.20.1"']
    installed = tuple(int(p) for p in re.findall(r"\d+", version("filelock"))[:3])
    assert installed >= (3, 20, 1)

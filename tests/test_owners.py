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

import json
import os
import re
import stat
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from local_sshd import HAVE_SSHD
from seeded_cache import dead_pid, leftover_run_dir, seed_cache
from test_domain import spec_for

from pytest_devbox.cli.main import main
from pytest_devbox.config.profiles import BUILTIN_PROFILES
from pytest_devbox.config.resolve import Places, resolve
from pytest_devbox.config.settings import Settings
from pytest_devbox.host.layout import CacheLayout
from pytest_devbox.pool.pool import Pool
from pytest_devbox.virt.domain_xml import build_xml

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


def node(path: Path, *guests: tuple[str, dict[str, str]]) -> str:
    """A test driver file running a devbox domain per (name, metadata); its URI."""
    xml = "".join(build_xml(spec_for("9p", "tcg", name=n, metadata=m)) for n, m in guests)
    path.write_text(f"<node>{xml}</node>")
    return f"test://{path}"


# --- finding 22: the cache is private, and refused when it is not ------------------------


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


# --- finding 4 (prune): every URI the project uses ----------------------------------------


def test_finding4_prune_keeps_run_dirs_of_guests_at_every_uri_of_the_project(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache, logs = tmp_path / "cache", tmp_path / "logs"
    logs.mkdir()
    seed_cache(cache)
    busy = leftover_run_dir(cache, "rkeep001", dead_pid())  # its session is gone...
    overlay = busy / "devbox-debian-12-rkeep001-0000.qcow2"
    dead = leftover_run_dir(cache, "rdead001", dead_pid())
    # ...but its --devbox-keep guest runs on at the URI the hosts map gives debian-12.
    meta = {"distro": "debian-12", "keep": "1", "overlay": str(overlay)}
    there = node(tmp_path / "node.xml", ("devbox-debian-12-rkeep001-0000", meta))
    p = project(tmp_path / "p")
    (p / "pyproject.toml").write_text(f'[tool.pytest-devbox.hosts]\ndebian-12 = "{there}"\n')
    argv = ["prune", "--uri", TEST_URI, "--cache", str(cache), "--offline", "--log-dir", str(logs)]
    assert main([*argv, "--project", str(p)]) == 0
    assert overlay.exists() and not dead.exists()
    capsys.readouterr()
    # A URI of the project that cannot be listed: no run dir goes, it might be in use.
    dead = leftover_run_dir(cache, "rdead002", dead_pid())
    (p / "pyproject.toml").write_text(
        f'[tool.pytest-devbox.hosts]\ndebian-11 = "test://{tmp_path}/none.xml"\n'
    )
    assert main([*argv, "--project", str(p)]) == 0
    assert overlay.exists() and dead.exists()
    assert "keeping every run dir and libvirt log: which guests run at" in capsys.readouterr().err


# --- finding 23: another project's image of a same-named profile --------------------------


def _image(cache: Path, key: str, project: Path | None) -> Path:
    path = CacheLayout(cache).image("debian-12", key)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    meta = {"key": key} | ({} if project is None else {"project": str(project)})
    path.with_suffix(".json").write_text(json.dumps(meta))
    return path


def test_finding23_prune_leaves_another_projects_image_of_a_same_named_profile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = project(tmp_path / "a"), project(tmp_path / "b")
    cache = tmp_path / "cache"
    seed_cache(cache)
    theirs = _image(cache, "a" * 16, a)  # A overrides debian-12: another key
    older = _image(cache, "b" * 16, b)  # B's own older key
    unrecorded = _image(cache, "c" * 16, None)  # built before projects were recorded
    argv = ["prune", "--uri", TEST_URI, "--cache", str(cache), "--offline", "--project", str(b)]
    assert main([*argv, "--log-dir", str(tmp_path)]) == 0
    assert theirs.exists() and not older.exists() and not unrecorded.exists()
    assert f"keeping {theirs.name}: another project's ({a}); --unknown removes it" in (
        capsys.readouterr().err
    )
    assert main([*argv, "--log-dir", str(tmp_path), "--unknown"]) == 0
    assert not theirs.exists()


def test_finding23_a_built_image_records_its_project(tmp_path: Path) -> None:
    cache_dir, p = tmp_path / "cache", project(tmp_path / "p")
    seed_cache(cache_dir)
    places = Places(cwd=p, ini_dir=p, rootdir=p)
    settings = resolve(
        {"cache_dir": str(cache_dir), "offline": True}, lambda _: None, places, env={}
    )
    profile = BUILTIN_PROFILES["debian-12"]
    cache = Pool([profile], settings.settings).cache

    def produce(tmp: Path) -> None:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp), "64M"], check=True)

    info = cache.ensure(profile, "d" * 16, produce)
    assert info.built and info.metadata["project"] == str(p)
    assert json.loads(info.path.with_suffix(".json").read_text())["project"] == str(p)
    assert Settings().rootdir is None  # made by hand (tests, scripts): nothing recorded

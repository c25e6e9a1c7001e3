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
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from importlib.metadata import version
from pathlib import Path

import libvirt
import paramiko
import pytest
from local_sshd import HAVE_SSHD, Sshd, host_key, run_sshd
from seeded_cache import dead_pid, leftover_run_dir, seed_cache
from test_domain import spec_for

from pytest_devbox.cli.main import main
from pytest_devbox.config.profiles import BUILTIN_PROFILES
from pytest_devbox.config.resolve import Places, resolve
from pytest_devbox.config.settings import Settings
from pytest_devbox.guest.plan import guest_connection
from pytest_devbox.host.layout import CacheLayout
from pytest_devbox.pool import kept
from pytest_devbox.pool.pool import Pool
from pytest_devbox.transport.keys import ensure_keypair, pin_host_key, public_key_line
from pytest_devbox.virt import domain as dom
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


@dataclass
class Host:
    """A cache whose key a real sshd admits, its host key pinned under ALIAS."""

    cache: Path
    sshd: Sshd

    def logins(self) -> str:
        time.sleep(0.2)  # sshd writes its log line as the login ends
        return self.sshd.log.read_text()

    def stored_ssh(self) -> tuple[str, ...]:
        """The root ssh line a Machine records (what `devbox ls` shows)."""
        conn = guest_connection(self.cache, self.sshd.port, ALIAS)
        return tuple(conn.ssh_command())


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    if not HAVE_SSHD:
        pytest.skip("needs OpenSSH's sshd and ssh-keygen")
    cache = tmp_path / "cache"
    layout = CacheLayout(cache)
    key = ensure_keypair(layout.ssh)
    authorized = tmp_path / "authorized_keys"
    authorized.write_text(public_key_line(key) + "\n")
    hk = host_key(tmp_path / "host_key")
    with run_sshd(tmp_path / "sshd", authorized, hk) as sshd:
        pin_host_key(layout.known_hosts, ALIAS, paramiko.Ed25519Key(filename=str(hk)), "sshd")
        yield Host(cache, sshd)


def new_name() -> str:
    return f"devbox-debian-12-{uuid.uuid4().hex[:8]}"


def node(path: Path, *guests: tuple[str, dict[str, str]]) -> str:
    """A test driver file running a devbox domain per (name, metadata); its URI."""
    xml = "".join(build_xml(spec_for("9p", "tcg", name=n, metadata=m)) for n, m in guests)
    path.write_text(f"<node>{xml}</node>")
    return f"test://{path}"


def kept_guests(
    cache: Path, path: Path, *records: tuple[Path, tuple[str, ...], str]
) -> tuple[str, list[kept.KeptGuest]]:
    """Kept guests of debian-12, one per (code dir, ssh line, failed test), running in
    the test driver file `path` and recorded in `cache`; the file's URI."""
    names = [new_name() for _ in records]
    uri = node(path, *((n, {"distro": "debian-12", "keep": "1"}) for n in names))
    guests = []
    for name, (code_dir, ssh, failed) in zip(names, records):
        guest = kept.KeptGuest(name, "debian-12", uri, "", ssh, str(code_dir), failed)
        kept.save(cache, guest)
        guests.append(guest)
    return uri, guests


@pytest.fixture
def virt() -> Iterator[libvirt.virConnect]:
    """Held for the test: the test driver forgets its domains with its last connection."""
    conn = dom.connect(TEST_URI)
    yield conn
    conn.close()


def running(virt: libvirt.virConnect) -> set[str]:
    return {name for name, _ in dom.list_devbox_domains(virt)}


# --- finding 2: run, ssh and up use this project's guests only --------------------------


@needs_sshd
def test_finding2_run_ssh_up_use_only_this_projects_guests(
    host: Host, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = project(tmp_path / "a"), project(tmp_path / "b")
    ssh = host.stored_ssh()
    # A's workspace, and B's own guest kept as a failed test's evidence.
    uri, (theirs, _) = kept_guests(
        host.cache, tmp_path / "node.xml", (a, ssh, ""), (b, ssh, "tests/test_x.py::test_y")
    )
    where = ["--uri", uri, "--cache", str(host.cache)]

    r = devbox("ssh", "debian-12", *where, "--project", str(b), "--", "true")
    assert r.returncode == 1, r.stderr
    assert "no debian-12 guest of this project is up" in r.stderr and theirs.name in r.stderr
    assert main(["run", "--all-up", *where, "--project", str(b), "--", "true"]) == 1
    assert "no guest of this project is up" in capsys.readouterr().err
    # A distro name boots a guest of its own (here it cannot: no template, offline).
    for command, tail in (("run", ["--", "true"]), ("up", [])):
        assert main([command, "debian-12", *where, "--offline", "--project", str(b), *tail]) == 1
        out, err = capsys.readouterr()
        assert "could not start: template 'debian-12'" in err and "already up" not in out
    assert "Accepted publickey" not in host.logins()  # nothing ran in A's guest

    assert main(["up", "debian-12", *where, "--project", str(a)]) == 0  # A's own: up
    assert f"debian-12: {theirs.name} is already up" in capsys.readouterr().out
    # Named in full, another project's guest is reachable on purpose.
    assert main(["run", "--root", theirs.name, *where, "--project", str(b), "--", "true"]) == 1
    assert f"{theirs.name} shares {a} as /code" in capsys.readouterr().err
    assert "Accepted publickey for root" in host.logins()


# --- findings 25 and 22: the login is rebuilt from the record, as devbox --------------


@needs_sshd
def test_finding25_run_and_ssh_log_in_as_devbox_and_as_root_on_request(
    host: Host, tmp_path: Path
) -> None:
    a = project(tmp_path / "a")
    uri, _ = kept_guests(host.cache, tmp_path / "node.xml", (a, host.stored_ssh(), ""))
    where = ["--uri", uri, "--cache", str(host.cache), "--project", str(a)]
    # This host has no user devbox (a guest has, with the caller's uid): sshd says who
    # was asked for, and turns that login away.
    assert main(["run", "debian-12", *where, "--", "true"]) == 255
    assert host.logins().count("Invalid user devbox") == 1
    assert "Accepted publickey for root" not in host.logins()
    assert devbox("ssh", "debian-12", *where, "--", "true").returncode == 255
    assert host.logins().count("Invalid user devbox") == 2
    # --root: root's login, which runs the line (this host has no /code: exit 1).
    assert main(["run", "--root", "debian-12", *where, "--", "true"]) == 1
    assert host.logins().count("Accepted publickey for root") == 1
    assert devbox("ssh", "--root", "debian-12", *where, "--", "true").returncode == 1
    assert host.logins().count("Accepted publickey for root") == 2


@needs_sshd
def test_finding22_a_records_ssh_line_is_never_run(host: Host, tmp_path: Path) -> None:
    a = project(tmp_path / "a")
    planted = tmp_path / "planted"
    # What another user who could write the record would leave: their program, with
    # the fields a rebuilt line takes (port, host key alias) around it.
    ssh = ("sh", "-c", f"touch {planted}", "-p", str(host.sshd.port), "-o", f"HostKeyAlias={ALIAS}")
    uri, (guest,) = kept_guests(host.cache, tmp_path / "node.xml", (a, ssh, ""))
    where = ["--uri", uri, "--cache", str(host.cache), "--project", str(a)]
    ran = main(["run", "debian-12", *where, "--", "true"])
    sshed = devbox("ssh", "debian-12", *where, "--", "true").returncode
    assert not planted.exists()
    # What ran was ssh, to the record's port, pinned to its alias: sshd saw both logins.
    assert (ran, sshed) == (255, 255)
    assert host.logins().count("Invalid user devbox") == 2
    # A record without a usable port says what to do, and runs nothing either.
    bad = ("sh", "-c", f"touch {planted}", "-p", "22; true")
    kept.save(host.cache, replace(guest, ssh=bad))
    r = devbox("ssh", guest.name, *where, "--", "true")
    assert r.returncode == 1 and "no usable port" in r.stderr and not planted.exists()


# --- finding 22: the cache is private, and refused when it is not ------------------------


def test_finding22_the_cache_is_made_0700_and_refused_when_not_ours(
    tmp_path: Path, shared: Path
) -> None:
    fresh = tmp_path / "fresh" / "cache"
    assert main(["ls", "--uri", TEST_URI, "--cache", str(fresh)]) == 0
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700  # not 0755 from the umask
    # Another user plants the cache dir first (a shared /tmp, $PYTEST_DEVBOX_CACHE).
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


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory like /tmp that another user can reach (tmp_path is root's only)."""
    path = Path(tempfile.mkdtemp(prefix="devbox-owners-"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path)


def test_finding22_filelock_floor_excludes_cve_2025_68146() -> None:
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    assert re.findall(r'"filelock\b[^"]*"', pyproject) == ['"filelock>=3.20.1"']
    installed = tuple(int(p) for p in re.findall(r"\d+", version("filelock"))[:3])
    assert installed >= (3, 20, 1)


# --- finding 3: destroy and rebuild ------------------------------------------------------


def test_finding3_destroy_and_rebuild_act_on_this_projects_recorded_guests(
    virt: libvirt.virConnect, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = project(tmp_path / "a"), project(tmp_path / "b")
    cache = tmp_path / "cache"
    ssh = ("ssh", "-p", "40022", "-o", f"HostKeyAlias={ALIAS}", "root@127.0.0.1")

    def up(code_dir: Path, *, recorded: bool = True) -> str:
        name = f"devbox-debian-12-{uuid.uuid4().hex[:8]}"
        meta = {"distro": "debian-12", "keep": "1"}
        dom.Domain.create(virt, spec_for("9p", "tcg", name=name, metadata=meta), autodestroy=False)
        if recorded:
            kept.save(cache, kept.KeptGuest(name, "debian-12", TEST_URI, "", ssh, str(code_dir)))
        return name

    theirs, mine = up(a), up(b)
    session = up(b, recorded=False)  # --devbox-keep, or another user's: no record here
    where = ["--uri", TEST_URI, "--cache", str(cache), "--project", str(b)]
    try:
        assert main(["destroy", "debian-12", *where]) == 0
        assert running(virt) >= {theirs, session} and mine not in running(virt)
        mine, older = up(b), up(b)
        assert main(["rebuild", "debian-12", "--offline", *where]) == 1  # no template here
        assert running(virt) >= {theirs, session} and not {mine, older} & running(virt)
        assert main(["destroy", "--all", *where]) == 0  # every guest recorded in this cache
        assert theirs not in running(virt) and session in running(virt)
        assert main(["destroy", session, *where]) == 0  # named in full: any guest
        assert session not in running(virt)
    finally:
        capsys.readouterr()
        main(["destroy", theirs, mine, session, *where])


def test_finding3_another_users_guest_is_no_traceback(shared: Path) -> None:
    """Bob (nobody) and Alice (root, this test) share one libvirt."""
    alice_run = shared / "alice" / "run" / "r1"
    alice_run.mkdir(parents=True)
    for d in (shared / "alice", shared / "alice" / "run", alice_run):
        d.chmod(0o755)
    overlay = alice_run / "devbox-debian-12-r1-0001.qcow2"
    overlay.write_bytes(b"alice's disk")
    meta = {"distro": "debian-12", "keep": "1", "overlay": str(overlay)}
    uri = node(shared / "node.xml", ("devbox-debian-12-r1-0001", meta))
    (shared / "node.xml").chmod(0o644)
    bob = shared / "bob"
    subprocess.run([*NOBODY, "mkdir", "-m", "0700", str(bob)], check=True)
    bob_project = bob / "project"
    where = ["--uri", uri, "--cache", str(bob / "cache"), "--project", str(bob_project)]
    subprocess.run(
        [*NOBODY, "sh", "-c", f"mkdir {bob_project}; :> {bob_project}/pytest.ini"], check=True
    )

    r = devbox("destroy", "--all", *where, cwd=shared, user=NOBODY)
    assert (r.returncode, r.stdout, r.stderr) == (0, "no kept devbox guest to destroy\n", "")
    r = devbox("destroy", "devbox-debian-12-r1-0001", *where, cwd=shared, user=NOBODY)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr == (
        f"cannot remove devbox-debian-12-r1-0001's overlay {overlay} (Permission denied): "
        "its owner or root can remove it\n"
    )
    assert overlay.exists()


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

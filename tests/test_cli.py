"""The devbox command: doctor, template, argument errors, ls and destroy.

Commands that need libvirt use the in-process test:///default driver (called through
`main`), so the fast tier never touches the host's libvirtd or its cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from test_domain import spec_for

from pytest_devbox.cli.main import main, parse
from pytest_devbox.host.layout import CacheLayout
from pytest_devbox.pool import kept
from pytest_devbox.virt import domain as dom

ROOT = Path(__file__).resolve().parent.parent
SOCK = Path("/run/libvirt/libvirt-sock")
URI = "test:///default"


def devbox(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_devbox.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.vm  # asks the host's libvirtd
def test_doctor_ok_on_this_host() -> None:
    r = devbox("doctor")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[ok  ] libvirt" in r.stdout
    assert "accel" in r.stdout


@pytest.mark.vm
def test_doctor_json() -> None:
    r = devbox("doctor", "--json")
    checks = {c["name"]: c for c in json.loads(r.stdout)}
    assert {"libvirt", "accel", "virt-builder", "qemu-img", "cache"} <= set(checks)
    assert checks["libvirt"]["ok"] is True


def test_doctor_fails_on_unreachable_libvirt(tmp_path: Path) -> None:
    r = devbox("doctor", "--uri", f"qemu:///system?socket={tmp_path}/none", "--json")
    assert r.returncode == 1
    libvirt = next(c for c in json.loads(r.stdout) if c["name"] == "libvirt")
    assert not libvirt["ok"] and "libvirtd is not running" in libvirt["detail"]
    assert "libvirtd -d" in libvirt["fix"]


def _libvirtd_pid() -> int | None:
    out = subprocess.run(["pidof", "libvirtd"], capture_output=True, text=True, check=False)
    return int(out.stdout.split()[0]) if out.stdout.strip() else None


@pytest.mark.vm
@pytest.mark.host_service
@pytest.mark.skipif(
    os.environ.get("CI") != "true"
    or os.geteuid() != 0
    or Path("/proc/1/comm").read_text().strip() == "systemd",
    reason="stops and restarts libvirtd by hand: root on a host without systemd only",
)
def test_doctor_with_libvirtd_stopped_then_setup_host() -> None:
    pid = _libvirtd_pid()
    assert pid, "libvirtd should be running before this test"
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while _libvirtd_pid() and time.monotonic() < deadline:
        time.sleep(0.2)
    if _libvirtd_pid():  # libvirtd can hang in shutdown; this test is about doctor
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
    try:
        r = devbox("doctor")
        assert r.returncode == 1
        line = next(ln for ln in r.stdout.splitlines() if ln.startswith("[FAIL] libvirt"))
        assert "libvirtd is not running" in line
        assert "libvirtd -d" in r.stdout
    finally:
        setup = subprocess.run(
            [str(ROOT / "scripts" / "setup-host")], capture_output=True, text=True, check=False
        )
    assert setup.returncode == 0, setup.stdout + setup.stderr
    assert "started libvirtd" in setup.stdout
    assert devbox("doctor").returncode == 0


def test_template_build_unknown_distro(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["template", "build", "debian-99", "--repo", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "debian-99" in err and "debian-12" in err


def test_build_unknown_distro_lists_known(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["build", "nosuch", "--offline"]) == 2
    err = capsys.readouterr().err
    assert "nosuch" in err and "centos-7" in err and "debian-12" in err


def test_destroy_nothing_matching(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["destroy", "devbox-no-such-guest", "--uri", URI, "--cache", str(tmp_path)])
    assert code == 1
    assert "no kept devbox guest named devbox-no-such-guest" in capsys.readouterr().err


# --- usage errors: one line, exit 2, before anything starts ---------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "nosuch", "--", "ls"], "unknown distro 'nosuch'; known distros: almalinux-10, "),
        (["run", "debian-12"], "nothing to run: devbox run DISTRO -- COMMAND"),
        (["run", "debian-11,,debian-12", "--", "ls"], "contains an empty distro name"),
        (["run", "--uri", "qemu", "debian-12", "--", "ls"], "--uri='qemu': not a libvirt URI"),
        (["up", "--code-dir", "/nonexistent", "debian-12"], "point --code-dir (or the"),
        (["up"], "name a distro, e.g. `devbox up debian-12`"),
        (["ssh"], "name one distro: devbox ssh debian-12"),
        (["destroy"], "name guests or distros to destroy, or give --all"),
        (["run", "--all-up", "debian-12", "--", "ls"], "name no distro with it"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_usage_errors(argv: list[str], message: str, tmp_path: Path) -> None:
    r = devbox(argv[0], "--cache", str(tmp_path), *argv[1:])
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("devbox: error: "), r.stderr
    assert message in lines[0]
    assert "Traceback" not in r.stderr and not r.stdout


def test_argparse_errors_name_the_subcommand_and_the_way_out() -> None:
    r = devbox("run", "debian-12", "ls", "-l")
    assert r.returncode == 2
    assert "devbox run: error: unrecognized arguments: -l (the command to run goes after --)" in (
        r.stderr
    )
    assert devbox("ls", "--", "x").returncode == 2


def test_every_subcommand_help_ends_with_an_example() -> None:
    commands = ["doctor", "template", "build", "up", "rebuild", "run", "ssh", "ls", "destroy"]
    for command in commands:
        text = devbox(command, "--help").stdout
        assert "\nexample:\n  devbox " + command in text, command
        assert text.rstrip().splitlines()[-1].startswith("  devbox "), command


def test_run_words_are_joined_like_ssh() -> None:
    args = parse(["run", "debian-11,debian-12", "--keep", "--", "ls /code | head -3;", "pwd"])
    assert args.distros == ["debian-11,debian-12"] and args.keep is True
    assert args.command == ["ls /code | head -3;", "pwd"]
    # Without --, the first word names the distros and the others are the command.
    args = parse(["run", "debian-12", "uname", "-r"][:3])
    assert (args.distros, args.command) == (["debian-12"], ["uname"])
    args = parse(["run", "--all-up", "--", "uname"])
    assert (args.distros, args.command, args.all_up) == (None, ["uname"], True)


# --- ls and destroy, against libvirt's test driver ------------------------------------


@pytest.fixture
def virt() -> Iterator[libvirt.virConnect]:
    """A connection held for the test: the test driver forgets its domains when the
    last connection of the process closes."""
    conn = dom.connect(URI)
    yield conn
    conn.close()


def _kept_domain(
    conn: libvirt.virConnect, cache: Path, distro: str, *, keep: bool = True, code_dir: str = "/src"
) -> str:
    name = f"devbox-{distro}-{uuid.uuid4().hex[:8]}"
    meta = {"distro": distro, "keep": "1" if keep else "0", "started": str(int(time.time()) - 600)}
    meta |= {"image_key": "0123456789abcdef", "owner_pid": "1"}
    dom.Domain.create(conn, spec_for("9p", "tcg", name=name, metadata=meta), autodestroy=False)
    if keep:
        ssh = ("ssh", "-i", "key", "-p", "40022", "root@127.0.0.1")
        kept.save(cache, kept.KeptGuest(name, distro, URI, "", ssh, code_dir=code_dir))
    return name


def test_ls_shows_state_port_uptime_image_and_ssh_line(
    virt: libvirt.virConnect, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = _kept_domain(virt, tmp_path, "debian-12")
    busy = _kept_domain(virt, tmp_path, "debian-11", keep=False)
    (CacheLayout(tmp_path).kept / "devbox-torn.json").write_text('{"name": ')  # a crash
    try:
        assert main(["ls", "--uri", URI, "--cache", str(tmp_path)]) == 0
        out = capsys.readouterr().out
        row = next(line for line in out.splitlines() if line.endswith(name))
        assert row.split()[:5] == ["debian-12", "running", "10", "min", "40022"]
        assert "0123456789abcdef" in row
        assert "    ssh -i key -p 40022 root@127.0.0.1" in out
        assert "in use by a pytest session (pid 1)" in out
        assert main(["ls", "--json", "--uri", URI, "--cache", str(tmp_path)]) == 0
        rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
        assert rows[name]["port"] == "40022" and rows[name]["kept"] is True
        assert rows[name]["code_dir"] == "/src" and rows[name]["uptime_seconds"] >= 600
        assert rows[busy]["ssh"] is None
    finally:
        assert main(["destroy", busy, name, "--uri", URI, "--cache", str(tmp_path)]) == 0


def test_destroy_by_distro_spares_session_guests(
    virt: libvirt.virConnect, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    name = _kept_domain(virt, tmp_path, "debian-12", code_dir=str(project))
    busy = _kept_domain(virt, tmp_path, "debian-12", keep=False)
    argv = ["--uri", URI, "--cache", str(tmp_path), "--project", str(project)]
    try:
        assert main(["destroy", "debian-12", *argv]) == 0
        assert f"destroyed {name} (debian-12)" in capsys.readouterr().out
        assert not list(CacheLayout(tmp_path).kept.glob("*.json"))  # its record went too
        assert main(["destroy", "--all", *argv]) == 0
        assert "no kept devbox guest to destroy" in capsys.readouterr().out
        assert busy in {n for n, _ in dom.list_devbox_domains(virt)}
    finally:
        main(["destroy", busy, *argv])


def test_ssh_when_nothing_is_up_says_how_to_start_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ssh", "debian-12", "--uri", URI, "--cache", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == "devbox: error: no debian-12 guest is up: start one with `devbox up debian-12`\n"

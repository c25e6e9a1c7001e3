"""The example project tested on real guests.

    pytest examples --devbox=debian-11,debian-12 -v -s

Every test taking `devbox` runs once per selected distro on that distro's shared guest
(one boot per distro for the whole session); `devbox_fresh` boots a guest of its own.
The guests see this directory (the rootdir, examples/) at /code.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pytest_devbox import Machine

PROJECT = Path(__file__).resolve().parent.parent
# The Debian release behind each profile this project knows (see pyproject.toml).
DEBIAN_MAJOR = {"debian-11": "11", "debian-12": "12", "debian-13": "13"}


def debian_major(devbox: Machine) -> str:
    # A user profile such as debian-11-9p names its template: that is the release.
    return DEBIAN_MAJOR[devbox.profile.template]


def test_kernel(devbox: Machine) -> None:
    kernel = devbox.run("uname -r").stdout.strip()
    print(f"{devbox.distro}: kernel {kernel}, booted in {devbox.boot_seconds:.1f} s")
    assert kernel


def test_debian_version(devbox: Machine) -> None:
    version = devbox.run("cat /etc/debian_version").stdout.strip()
    assert version.split(".")[0] == debian_major(devbox)


def test_sysinfo_script(devbox: Machine) -> None:
    info = json.loads(devbox.run("python3 /code/sysinfo.py").stdout)
    print(f"{devbox.distro}: {info}")
    assert info["id"] == "debian"
    assert info["version_id"] == debian_major(devbox)
    assert info["kernel"] == devbox.run("uname -r").stdout.strip()


def test_code_is_the_project(devbox: Machine) -> None:
    remote = devbox.run("sha256sum /code/hello.c").stdout.split()[0]
    assert remote == hashlib.sha256((PROJECT / "hello.c").read_bytes()).hexdigest()
    if devbox.share == "sync":  # a copy (a remote host, or --devbox-share=sync): no mount
        assert devbox.run("mountpoint -q /code", check=False).exit_status != 0
        return
    fstype = devbox.run("findmnt -n -o FSTYPE /code").stdout.strip()
    assert fstype == devbox.share


def test_hello_builds_and_runs(devbox: Machine) -> None:
    # Out of tree: both guests build the same shared /code at the same time.
    out = f"/tmp/build-{devbox.distro}"
    devbox.run(f"make -C /code O={out}")
    hello = devbox.run(f"{out}/hello").stdout
    print(f"{devbox.distro}: {hello.strip()}")
    pretty = devbox.run('. /etc/os-release && echo "$PRETTY_NAME"').stdout.strip()
    libc = devbox.run("getconf GNU_LIBC_VERSION").stdout.split()[1]
    assert f"hello from {pretty}\n" in hello
    assert f"glibc {libc} " in hello
    assert not (PROJECT / "hello").exists(), "the build wrote into the shared source tree"


def test_put_and_get(devbox: Machine, tmp_path: Path) -> None:
    text = f"round trip {secrets.token_hex(8)}\n"
    sent = tmp_path / "sent.txt"
    sent.write_text(text)
    devbox.put(sent, "/tmp/example.txt")
    devbox.run("tr a-z A-Z < /tmp/example.txt > /tmp/example.upper")
    back = tmp_path / "back.txt"
    devbox.get("/tmp/example.upper", back)
    assert back.read_text() == text.upper()


@pytest.mark.devbox("debian-12")
def test_bookworm_python(devbox: Machine) -> None:
    # Only where it holds: Debian 12 ships Python 3.11.
    assert devbox.run("python3 --version").stdout.startswith("Python 3.11.")


@pytest.mark.devbox(exclude=["debian-11", "debian-11-9p"])
def test_tomllib(devbox: Machine) -> None:
    # Everywhere but where it cannot hold: Debian 11's Python 3.9 has no tomllib.
    devbox.run(["python3", "-c", "import tomllib"])


def test_commands_run_as_you_and_root_is_one_argument_away(devbox: Machine) -> None:
    # By default a command runs as the guest user devbox, who has your uid and gid...
    assert devbox.run("echo $HOME").stdout.strip() == "/home/devbox"
    assert devbox.run("id -u").stdout.strip() == str(os.getuid())
    assert devbox.run("id -u", user="root").stdout.strip() == "0"
    # ...so what a test writes under /code is yours, and you can delete it.
    written = PROJECT / f"written-by-{devbox.distro}-{secrets.token_hex(4)}.txt"
    try:
        devbox.run(f"echo hi > /code/{written.name}")
        if devbox.share == "sync":  # /code is a copy: the file stays in the guest
            owner = devbox.run(f"stat -c %u:%g /code/{written.name}").stdout.strip()
            assert owner == f"{os.getuid()}:{os.getgid()}"
            return
        # Its group is yours too, unless you are not in libvirt's QEMU group (kvm on
        # Debian): QEMU then runs in that group, to enter libvirt's per-domain dirs.
        assert written.stat().st_uid == os.getuid()
    finally:
        written.unlink(missing_ok=True)


def test_guest_root_plants_nothing_on_the_host(devbox: Machine) -> None:
    # A guest is untrusted code: what its root makes in /code is a plain file on the host,
    # never a setuid-root program or a device node (9p's mapped mode by default).
    if devbox.share == "sync":
        pytest.skip("/code is a copy in this guest: nothing it does reaches the host")
    planted = PROJECT / f"planted-by-{devbox.distro}-{secrets.token_hex(4)}"
    script = (
        f"mkdir /code/{planted.name} && cd /code/{planted.name} && cp /bin/sh x && "
        "chown 0:0 x && chmod 4755 x && mknod n c 1 3 && stat -c '%u %a %F' x n"
    )
    try:
        seen = devbox.run(script, user="root").stdout.splitlines()
        # In the guest it all happened...
        assert seen == ["0 4755 regular file", "0 644 character special file"], seen
        # ...and on the host neither is what it claims to be.
        for name in ("x", "n"):
            mode = (planted / name).lstat().st_mode
            assert stat.S_ISREG(mode), f"{name}: {stat.filemode(mode)}"
            assert not mode & (stat.S_ISUID | stat.S_ISGID), f"{name}: {stat.filemode(mode)}"
    finally:
        devbox.run(f"rm -rf /code/{planted.name}", user="root", check=False)


@pytest.mark.devbox("debian-12")  # one extra boot is enough for the demo
def test_fresh_guest_is_private(devbox_fresh: Machine, devbox: Machine) -> None:
    devbox_fresh.run("echo broken > /etc/devbox-example && rm /usr/bin/make", user="root")
    assert devbox_fresh.run("test -e /usr/bin/make", check=False).exit_status == 1
    # The shared guest of the same distro is untouched by what the fresh one did.
    assert devbox.run("test -e /etc/devbox-example", check=False).exit_status == 1
    devbox.run("test -x /usr/bin/make")

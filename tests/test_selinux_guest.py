"""An SELinux-enforcing guest (debian-12-selinux, VM tier): the relabel step that ends
every SELinux profile's image build is what lets sshd, the devbox user and /code work.

Needs `devbox template build debian-12-selinux` first.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from guests import GUEST_GID, GUEST_UID

from pytest_devbox.config.profiles import BUILTIN_PROFILES
from pytest_devbox.guest.machine import Machine
from pytest_devbox.image.cache import ImageCache
from pytest_devbox.image.selinux import RELABEL_COMMAND

pytestmark = pytest.mark.vm

# What the build writes and sshd or the devbox user must read: each must carry its label.
LABELS = {
    "/etc/ssh/ssh_host_ed25519_key": "sshd_key_t",
    "/root/.ssh/authorized_keys": "ssh_home_t",
    "/home/devbox/.ssh/authorized_keys": "ssh_home_t",
    "/etc/shadow": "shadow_t",
    "/etc/passwd": "etc_t",
}
# A denial touching any of these is one the relabel step exists to prevent.
RELEVANT = re.compile(
    r'sshd|ssh-keygen|ssh_|authorized_keys|devbox|/code|virtiofs|fusefs|shadow|comm="mount"'
)


@pytest.fixture(scope="module")
def enforcing(cache: ImageCache, code_dir: Path) -> Iterator[Machine]:
    profile = BUILTIN_PROFILES["debian-12-selinux"]
    # The opt-in: the template's policy labels virtiofs (genfscon), which these tests
    # check; by default this profile's /code would be 9p (config/code_ids.py).
    with Machine.start(profile, cache=cache, code_dir=code_dir, code_ids="passthrough") as m:
        yield m


def test_the_image_build_ends_with_the_relabel_step(enforcing: Machine, cache: ImageCache) -> None:
    commands = cache.layout.commands_file("debian-12-selinux", enforcing.image.key)
    if commands.is_file():  # written by whoever built the image
        assert commands.read_text().splitlines()[-1] == RELABEL_COMMAND
    assert enforcing.run("test -e /.autorelabel", check=False).exit_status == 1


def test_the_guest_enforces_selinux(enforcing: Machine) -> None:
    # /usr/sbin is on root's PATH only, as on any Debian.
    assert enforcing.run("getenforce", user="root").stdout.strip() == "Enforcing"
    cmdline = enforcing.run("cat /proc/cmdline").stdout
    assert "security=selinux" in cmdline and "selinux=1" in cmdline
    assert "SELINUX=enforcing" in enforcing.run("cat /etc/selinux/config").stdout
    # sshd moved our session into the login context: it runs confined, not unlabeled.
    context = enforcing.run("id -Z", user="root").stdout.strip()
    assert context.startswith("unconfined_u:unconfined_r:"), context


def test_files_the_build_wrote_are_labelled(enforcing: Machine) -> None:
    for path, label in LABELS.items():
        context = enforcing.run(["stat", "-c", "%C", path], user="root").stdout.strip()
        assert f":{label}:" in context, f"{path}: {context}"


def test_ssh_as_root_and_as_the_devbox_user(enforcing: Machine) -> None:
    assert enforcing.run("id -un", user="root").stdout.strip() == "root"
    assert enforcing.run("id -un").stdout.strip() == "devbox"  # the default login
    # A login of its own as devbox: sshd reads ~devbox/.ssh/authorized_keys itself.
    argv = [a.replace("root@", "devbox@") for a in enforcing.ssh_argv()]
    login = subprocess.run(
        [*argv, "-o", "BatchMode=yes", "id -un; id -Z"], capture_output=True, text=True, timeout=120
    )
    assert login.returncode == 0, login.stderr
    assert login.stdout.splitlines()[0] == "devbox"


def test_code_is_mounted_and_writable_by_the_devbox_user(
    enforcing: Machine, code_dir: Path
) -> None:
    assert enforcing.run("findmnt -no FSTYPE /code").stdout.strip() == "virtiofs"
    # Labelled by the template's genfscon, not unlabeled_t.
    assert ":fusefs_t:" in enforcing.run("stat -c %C /code").stdout
    assert enforcing.run("cat /code/from-host.txt").stdout == "written on the host\n"
    enforcing.run("echo enforcing > /code/by-devbox-selinux")  # as devbox, by default
    written = code_dir / "by-devbox-selinux"
    assert written.read_text() == "enforcing\n"
    assert (written.stat().st_uid, written.stat().st_gid) == (GUEST_UID, GUEST_GID)


def test_no_avc_denial_for_sshd_the_keys_the_user_or_the_share(enforcing: Machine) -> None:
    # Last, so the checks above (logins, /code writes) have had their chance to be denied.
    audit = enforcing.run(
        "grep -h 'avc: *denied' /var/log/audit/audit.log; dmesg | grep 'avc: *denied'",
        check=False,
        user="root",
    ).stdout.splitlines()
    print(f"{len(audit)} AVC denial lines in the audit log and dmesg:", *audit, sep="\n")
    assert enforcing.run("systemctl is-active auditd").stdout.strip() == "active"
    assert [line for line in audit if RELEVANT.search(line)] == []

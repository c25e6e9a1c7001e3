"""The SELinux relabel step: which virt-builder flag a version takes, and the shell."""

from __future__ import annotations

import os
import subprocess

import pytest

from pytest_devbox.image.selinux import (
    NO_RELABEL_FLAG,
    RELABEL_COMMAND,
    RELABEL_SHELL,
    builder_flags,
    guestfish_quote,
    tool_version,
)


@pytest.mark.parametrize(
    ("version", "flags"),
    [
        # Debian 12's: relabels only when asked and rejects --no-selinux-relabel.
        ("virt-builder 1.48.2", []),
        ("virt-builder 1.49.0", []),
        # 1.49.1 made relabelling the default (guestfs-tools 19de3d1c).
        ("virt-builder 1.49.1", [NO_RELABEL_FLAG]),
        ("virt-builder 1.50.0fedora=40,release=1.fc40", [NO_RELABEL_FLAG]),
        ("virt-builder 2.0.0", [NO_RELABEL_FLAG]),
        ("", []),
    ],
)
def test_the_no_relabel_flag_follows_the_virt_builder_version(
    version: str, flags: list[str]
) -> None:
    assert builder_flags(version) == flags


def test_this_hosts_virt_builder_version_is_read() -> None:
    out = subprocess.run(["virt-builder", "--version"], capture_output=True, text=True)
    assert tool_version(out.stdout) is not None, out.stdout


def test_the_relabel_step_is_the_researched_command_and_valid_sh() -> None:
    assert RELABEL_COMMAND == "run-command " + RELABEL_SHELL
    # The guest's own setfiles, with the guest's policy type, over every real mount.
    assert ". /etc/selinux/config && setfiles -e /dev -e /proc -e /sys " in RELABEL_SHELL
    assert "/etc/selinux/${SELINUXTYPE:-targeted}/contexts/files/file_contexts" in RELABEL_SHELL
    assert "/proc/mounts" in RELABEL_SHELL
    assert "restorecon" not in RELABEL_SHELL and " -F" not in RELABEL_SHELL
    subprocess.run(["sh", "-n", "-c", RELABEL_SHELL], check=True)


@pytest.mark.skipif(os.path.exists("/etc/selinux/config"), reason="would relabel this SELinux host")
def test_the_relabel_step_is_a_no_op_without_a_policy() -> None:
    # No /etc/selinux/config here: nothing runs, status 0 (debian-12 is no different).
    proc = subprocess.run(["sh", "-c", RELABEL_SHELL], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == ""


def test_guestfish_quote_escapes_quotes_and_backslashes() -> None:
    assert guestfish_quote('a "b" \\c') == '"a \\"b\\" \\\\c"'

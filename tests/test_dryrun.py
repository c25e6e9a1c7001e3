"""`devbox build --dry-run`: the exact argv and commands file, offline, nothing built."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from index_server import serve

from pytest_devbox.cli.main import main
from pytest_devbox.image.selinux import builder_flags

RELABEL = (
    "run-command if [ -f /etc/selinux/config ] && command -v setfiles >/dev/null; then"
    " . /etc/selinux/config && setfiles -e /dev -e /proc -e /sys"
    " /etc/selinux/${SELINUXTYPE:-targeted}/contexts/files/file_contexts"
    " $(awk '$3 ~ /^(xfs|ext[234]|btrfs)$/ {print $2}' /proc/mounts"
    ' | while read m; do [ -d "$m" ] && echo "$m"; done | sort -u); fi'
)
USER_LINES = (
    """mkdir /code
@FSTAB@run-command getent group devbox >/dev/null || groupadd -o -g @GID@ devbox
run-command id -u devbox >/dev/null 2>&1 || useradd -o -m -u @UID@ -g @GID@ -s /bin/bash devbox
mkdir /etc/sudoers.d
append-line /etc/sudoers.d/devbox:devbox ALL=(ALL) NOPASSWD:ALL
chmod 0440:/etc/sudoers.d/devbox
ssh-inject devbox:file:@CACHE@/ssh/id_ed25519.pub
append-line /etc/ssh/sshd_config:MaxSessions 64
append-line /etc/ssh/sshd_config:MaxStartups 64:30:128
run-command ssh-keygen -A
"""
    + RELABEL
)
UNKNOWN = "????????????????"
HEAD = """# @D@: template @T@
# firmware bios, cpu any x86-64, end of life @EOL@
# template revision: unknown
# cache key unknown: template '@T@' (distro '@D@') is in none of the configured \
virt-builder repositories; searched: no repository.
$ @VB@ @T@ --format qcow2 -o '@CACHE@/images/@D@-@K@.qcow2.partial' \
--cache @CACHE@/virt-builder-cache --hostname devbox-@D@ \
--ssh-inject root:file:@CACHE@/ssh/id_ed25519.pub --root-password random \
--commands-from-file '@CACHE@/recipes/@D@-@K@.commands'@FLAGS@
# commands file @CACHE@/recipes/@D@-@K@.commands:
"""
CENTOS7 = (
    HEAD.replace("@D@", "centos-7").replace("@T@", "centos-7.8").replace("@EOL@", "2024-06-30")
    + r"""run-command sed -i -e 's/^mirrorlist=/#mirrorlist=/' -e 's|^#\?baseurl=http://mirror.centos.org/centos/\$releasever/|baseurl=http://vault.centos.org/7.8.2003/|' /etc/yum.repos.d/CentOS-*.repo
install yum-utils
run-command yum-config-manager --enable centosplus
run-command sed -i -e 's/^DEFAULTKERNEL=kernel$/DEFAULTKERNEL=kernel-plus/' /etc/sysconfig/kernel
append-line /etc/dracut.conf.d/virtio.conf:add_drivers+=" virtio_blk virtio_scsi virtio_pci virtio_console "
append-line /etc/modules-load.d/9pnet_virtio.conf:9pnet_virtio
install kernel-plus
append-line /etc/fstab:/code /code 9p trans=virtio,version=9p2000.L,msize=262144,nofail 0 0
"""  # noqa: E501
    + USER_LINES.replace("@FSTAB@", "")
)
CENTOS8 = (
    HEAD.replace("@D@", "centos-8")
    .replace("@T@", "centos-8.2")
    .replace("@EOL@", "2021-12-31")
    .replace("@FLAGS@", "@FLAGS@ --no-network")
    + r"""run-command sed -i -e 's/^mirrorlist=/#mirrorlist=/' -e 's|^#\?baseurl=http://mirror.centos.org/\$contentdir/\$releasever/|baseurl=http://vault.centos.org/8.2.2004/|' /etc/yum.repos.d/CentOS-*.repo
"""  # noqa: E501
    + USER_LINES.replace(
        "@FSTAB@", "append-line /etc/fstab:/code /code virtiofs defaults,nofail 0 0\n"
    )
)


def expected(text: str, cache: Path) -> str:
    vb = shutil.which("virt-builder")
    assert vb is not None
    version = subprocess.run([vb, "--version"], capture_output=True, text=True).stdout
    flags = builder_flags(version)  # none on 1.48 (Debian 12)
    return (
        text.replace("@CACHE@", str(cache))
        .replace("@VB@", vb)
        .replace("@K@", UNKNOWN)
        .replace("@FLAGS@", "".join(" " + f for f in flags))
        .replace("@UID@", str(os.getuid()))
        .replace("@GID@", str(os.getgid()))
    )


def test_dry_run_pins_the_centos_7_and_8_builds_offline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    assert (
        main(["build", "--dry-run", "--offline", "--cache", str(cache), "centos-7", "centos-8"])
        == 0
    )
    out = capsys.readouterr().out
    assert out == expected(CENTOS7, cache) + "\n\n" + expected(CENTOS8, cache) + "\n"
    # What the issue asks to see, stated plainly too:
    c7 = out.split("\n\n# centos-8")[0].splitlines()
    assert c7[-1] == RELABEL  # the labelling step, last
    assert c7.index("install yum-utils") < c7.index(
        "run-command yum-config-manager --enable centosplus"
    )
    nine_p = [line for line in c7 if line.startswith("append-line /etc/fstab:/code")]
    assert len(nine_p) == 1 and "nofail" in nine_p[0] and "version=9p2000.L" in nine_p[0]
    # Nothing was built or written but the cache's key pair.
    assert not (cache / "images").exists() and not (cache / "recipes").exists()


def test_dry_run_reads_no_index_over_the_network(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    with serve("[centos-7.8]\nfile=x\nrevision=1\narch=x86_64\n") as server:
        # Public index configured too (no --offline): neither it nor --repo is fetched.
        rc = main(["build", "--dry-run", "--cache", str(cache), "--repo", server.uri, "centos-8"])
        assert server.hits == 0
    assert rc == 0
    out = capsys.readouterr().out
    assert f"# template revision unknown in {server.uri}: the index was not read" in out
    assert "# template revision unknown in https://builder.libguestfs.org/index.asc" in out
    assert out.splitlines()[-1] == RELABEL


def test_dry_run_shows_the_revision_and_key_a_local_index_gives(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    index = cache / "templates" / "index"
    index.parent.mkdir(parents=True)
    index.write_text(
        "[debian-12]\nname=d\narch=x86_64\nfile=d.qcow2.xz\nrevision=7\nsize=1\n"
        f"format=qcow2\nexpand=/dev/sda1\nchecksum[sha512]={'ab' * 8}\n"
    )
    assert main(["build", "--dry-run", "--offline", "--cache", str(cache), "debian-12"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == f"# template revision 7 (x86_64) in {index.as_uri()}"
    key = lines[3].removeprefix("# cache key ")
    assert len(key) == 16 and "?" not in key
    assert f"-o {cache}/images/debian-12-{key}.qcow2.partial" in lines[4]
    assert lines[-1] == "run-command ssh-keygen -A"  # no SELinux in debian-12: no relabel

"""What a local template is made of: suite, packages, the mmdebstrap hook and the
guestfish script, and the hash of all that. Pure: nothing here runs a tool.

A template is a bootable qcow2 disk made in three steps (image/templates/build.py):
``mmdebstrap`` writes a minbase root file system as a tarball, ``guestfish`` lays it on a
partitioned disk (ext4 + extlinux), ``qemu-img`` converts it to qcow2 (not compressed).

A *variant* is a suite's recipe plus packages, a hook tail and guestfish lines
(``debian-12-selinux``). The plain recipes' texts are exactly what they were before
variants existed, so their recipe hashes, and the CI caches keyed on them, stay put.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from ...errors import UnknownDistro
from ..selinux import RELABEL_SHELL, guestfish_quote

DEBIAN_SUITES: dict[str, str] = {
    "debian-11": "bullseye",
    "debian-12": "bookworm",
    "debian-13": "trixie",
}
DEFAULT_MIRROR = "http://deb.debian.org/debian"

# Bump whenever the scripts below change in a way the rendered text does not show.
BUILD_SCRIPT_VERSION = 2  # 2: no xz (build.py)
DISK_SIZE = 4 * 1024**3
ROOT_PARTITION = "/dev/sda1"

# linux-image-amd64, not the cloud kernel: the cloud kernel lacks 9p.
PACKAGES: tuple[str, ...] = (
    "linux-image-amd64",
    "systemd-sysv",
    "udev",
    "openssh-server",
    "extlinux",
    "python3",
    "sudo",
    "iproute2",
    "dbus",
)
# From bookworm on, systemd-resolved is its own package (bullseye ships it in systemd).
_SUITE_PACKAGES: dict[str, tuple[str, ...]] = {
    "bookworm": ("systemd-resolved",),
    "trixie": ("systemd-resolved",),
}

# Run by mmdebstrap on the host with the root directory as $1 (a --customize-hook).
_CUSTOMIZE_SCRIPT = r"""#!/bin/sh
set -eu
root="$1"

echo devbox > "$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tdevbox\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
    > "$root/etc/hosts"
echo 'UUID=@ROOT_UUID@ / ext4 errors=remount-ro 0 1' > "$root/etc/fstab"

# Networking without ifupdown: systemd-networkd DHCP on every wired interface.
mkdir -p "$root/etc/systemd/network"
cat > "$root/etc/systemd/network/80-devbox-dhcp.network" <<'EOF'
[Match]
Name=en* eth*

[Network]
DHCP=yes
EOF
ln -sf ../run/systemd/resolve/stub-resolv.conf "$root/etc/resolv.conf"

# Host keys are made by each guest at first boot, never shared through the template:
# Debian's ssh.service does not create missing keys, and its `sshd -t` fails without.
rm -f "$root"/etc/ssh/ssh_host_*
cat > "$root/etc/systemd/system/devbox-ssh-keygen.service" <<'EOF'
[Unit]
Description=Generate missing SSH host keys
Before=ssh.service ssh.socket
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A
RemainAfterExit=yes

[Install]
WantedBy=multi-user.target ssh.service
EOF
mkdir -p "$root/etc/ssh/sshd_config.d"
printf 'PasswordAuthentication no\nKbdInteractiveAuthentication no\n' \
    > "$root/etc/ssh/sshd_config.d/50-devbox.conf"
chroot "$root" systemctl enable systemd-networkd.service systemd-resolved.service \
    ssh.service devbox-ssh-keygen.service

# No password login: root stays locked (virt-builder sets its own root password).
chroot "$root" passwd --lock root

# Boot loader config; kernel messages and a getty on the serial console.
kver=$(cd "$root/boot" && ls vmlinuz-* | sed 's/^vmlinuz-//' | sort -V | tail -n 1)
mkdir -p "$root/boot/extlinux"
cat > "$root/boot/extlinux/extlinux.conf" <<EOF
DEFAULT linux
PROMPT 0
TIMEOUT 0
LABEL linux
  LINUX /boot/vmlinuz-$kver
  INITRD /boot/initrd.img-$kver
  APPEND root=UUID=@ROOT_UUID@ ro console=tty0 console=ttyS0,115200n8
EOF

# An empty machine-id makes systemd generate a fresh one at first boot.
: > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
"""

# guestfish script; 64bit is off because extlinux cannot boot every 64bit ext4.
_GUESTFISH_SCRIPT = """add @DISK@ format:raw
run
part-init /dev/sda mbr
part-add /dev/sda p 2048 -1
part-set-bootable /dev/sda 1 true
mkfs ext4 /dev/sda1 features:^64bit label:root
set-uuid /dev/sda1 @ROOT_UUID@
mount /dev/sda1 /
tar-in @ROOTFS@ / xattrs:true acls:true
extlinux /boot/extlinux
copy-file-to-device /usr/lib/EXTLINUX/mbr.bin /dev/sda size:440
umount-all
"""


# --- the SELinux variant ------------------------------------------------------------------
# Debian's SELinux stack from its own mirror: the reference policy, the tools (setfiles,
# load_policy) and auditd, which writes the AVC records the tests read.
_SELINUX_PACKAGES = ("selinux-basics", "selinux-policy-default", "auditd")
_SELINUX_HOOK = r"""
# --- SELinux, enforcing ---
# What selinux-activate does for GRUB, for our extlinux: Debian's kernel starts AppArmor
# unless told otherwise. No /.autorelabel: guestfish labels the disk (see below).
printf 'SELINUX=enforcing\nSELINUXTYPE=default\n' > "$root/etc/selinux/config"
rm -f "$root/.autorelabel"
sed -i 's/^  APPEND .*/& security=selinux selinux=1/' "$root/boot/extlinux/extlinux.conf"

# Debian 12's reference policy has no labelling rule for virtiofs (no fs_use_xattr, no
# genfscon): the share is unlabeled_t, creating a file there is denied (`associate`),
# and a context= mount option is denied to systemd's mount (`relabelfrom`), all measured
# on this template. Label it fusefs_t, the type of FUSE mounts, which virtiofs is, with
# a genfscon as Fedora's policy does (O. Mosnacek, selinux@vger.kernel.org 2020-12-07,
# "virtiofs and its optional xattr support vs. fs_use_xattr", re Fedora PR 478).
printf '(genfscon virtiofs "/" (system_u object_r fusefs_t ((s0) (s0))))\n' \
    > "$root/tmp/devbox-virtiofs.cil"
chroot "$root" semodule -i /tmp/devbox-virtiofs.cil
rm "$root/tmp/devbox-virtiofs.cil"
"""
# Label the whole disk with the same step an image build ends with. extlinux makes
# ldlinux.sys immutable, and an immutable file takes no xattr: lift the flag around the
# relabel, so the file is labelled once here and later relabels find nothing to change.
_SELINUX_GUESTFISH = (
    "set-e2attrs /boot/extlinux/ldlinux.sys i clear:true\n"
    f"sh {guestfish_quote(RELABEL_SHELL)}\n"
    "set-e2attrs /boot/extlinux/ldlinux.sys i\n"
)


@dataclass(frozen=True)
class TemplateRecipe:
    """Everything that shapes one local template (and its index entry)."""

    distro: str
    suite: str
    osinfo: str
    packages: tuple[str, ...]
    customize: str
    guestfish: str
    title: str
    notes: str  # with {mirror} for the mirror it is built from


def packages_for(suite: str) -> tuple[str, ...]:
    """The packages installed on top of minbase for a Debian suite."""
    return PACKAGES + _SUITE_PACKAGES.get(suite, ())


def _plain(distro: str, suite: str) -> TemplateRecipe:
    number = distro.split("-")[1]
    return TemplateRecipe(
        distro=distro,
        suite=suite,
        osinfo=f"debian{number}",
        packages=packages_for(suite),
        customize=_CUSTOMIZE_SCRIPT,
        guestfish=_GUESTFISH_SCRIPT,
        title=f"Debian {number} ({suite}), pytest-devbox local build",
        notes=(
            f"Debian {suite} minbase from {{mirror}}, built by pytest-devbox.\n"
            "systemd-networkd DHCP, sshd with host keys made at first boot,\n"
            "serial console on ttyS0, root locked."
        ),
    )


def _selinux(base: TemplateRecipe, distro: str) -> TemplateRecipe:
    head, end = base.guestfish.rsplit("umount-all\n", 1)
    return TemplateRecipe(
        distro=distro,
        suite=base.suite,
        osinfo=base.osinfo,
        packages=base.packages + _SELINUX_PACKAGES,
        customize=base.customize + _SELINUX_HOOK,
        guestfish=head + _SELINUX_GUESTFISH + "umount-all\n" + end,
        title=base.title.replace("), ", "), SELinux enforcing, "),
        notes=base.notes + "\nSELinux enforcing (Debian reference policy), labelled at build.",
    )


TEMPLATE_RECIPES: Mapping[str, TemplateRecipe] = MappingProxyType(
    {
        **{d: _plain(d, s) for d, s in DEBIAN_SUITES.items()},
        "debian-12-selinux": _selinux(_plain("debian-12", "bookworm"), "debian-12-selinux"),
    }
)


def template_recipe(distro: str) -> TemplateRecipe:
    """The recipe of ``distro``; UnknownDistro listing the known ones otherwise."""
    try:
        return TEMPLATE_RECIPES[distro]
    except KeyError:
        known = ", ".join(sorted(TEMPLATE_RECIPES))
        raise UnknownDistro(
            f"no local template recipe for {distro!r}; known: {known}. "
            "Other distros come from the public virt-builder repository."
        ) from None


def recipe_hash(distro: str, mirror: str) -> str:
    """Hash of everything that shapes a template; a change means a rebuild."""
    r = template_recipe(distro)
    recipe = {
        "distro": distro,
        "suite": r.suite,
        "mirror": mirror,
        "packages": r.packages,
        "customize": r.customize,
        "guestfish": r.guestfish,
        "disk_size": DISK_SIZE,
        "version": BUILD_SCRIPT_VERSION,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()

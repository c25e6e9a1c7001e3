"""Labelling what an offline build wrote into an SELinux guest: one shell step for both
the image build (virt-builder) and the SELinux template variant (guestfish).

libguestfs builds in an appliance that boots with ``selinux=0`` (libguestfs 1.48.6
lib/appliance-kcmdline.c l.302-305), so every file a build writes carries no
``security.selinux`` label, and a confined sshd in an enforcing guest cannot read its
host keys or authorized_keys. guestfs-tools before 1.49.1 relabels only when asked
(customize_run.ml l.418-421 in 1.48.2), and Debian's appliance has no ``setfiles``
(libguestfs 1.48.6 appliance/packagelist.in lists policycoreutils for Red Hat only), so
``--selinux-relabel`` there falls back to touching ``/.autorelabel`` (libguestfs-common
mlcustomize/SELinux_relabel.ml l.31-44): a relabel and reboot on every overlay boot.

So the build runs the *guest's own* setfiles, chrooted into the guest (virt-customize
``run-command`` and guestfish ``sh`` bind-mount /dev, /proc, /sys first: libguestfs
daemon/sh.c l.60-118). setfiles works with SELinux disabled (the context check
tolerates ENOENT: policycoreutils 2.5 setfiles.c l.93-112) and writes plain xattrs.
"""

from __future__ import annotations

import re

# Research notes for issue 9 (notes/issue9-research.md, finding 1), verbatim:
# - /etc/selinux/config is shell syntax; SELINUXTYPE defaults to "targeted" as in
#   libselinux (Debian's is "default").
# - setfiles does not cross mount points (2.5 restore.c l.339-344), and the CentOS
#   templates have a separate /boot where kernel-plus writes, so every real mount point
#   is passed: /proc/mounts inside the chroot lists guest paths only; `-d` drops the
#   /etc/resolv.conf file bind-mount libguestfs adds when the network is on; vfat
#   (/boot/efi) cannot hold xattrs and is left out.
# - No -F (libguestfs-common 5f2eea0 dropped it: it resets customizable types), no -m/-C
#   (absent from setfiles 2.5, CentOS 7's). Not restorecon: it exits silently when
#   SELinux is disabled (setfiles.c l.224-227), i.e. always in the appliance.
# - A no-op where the guest has no policy or no setfiles.
RELABEL_SHELL = (
    "if [ -f /etc/selinux/config ] && command -v setfiles >/dev/null; then"
    " . /etc/selinux/config && setfiles -e /dev -e /proc -e /sys"
    " /etc/selinux/${SELINUXTYPE:-targeted}/contexts/files/file_contexts"
    " $(awk '$3 ~ /^(xfs|ext[234]|btrfs)$/ {print $2}' /proc/mounts"
    ' | while read m; do [ -d "$m" ] && echo "$m"; done | sort -u); fi'
)
# The commands-file line: the last step of an image build, after every file is written.
# --root-password runs after the commands file but copies /etc/shadow's xattrs back
# (guestfs-tools customize/password.ml l.86-88, l.122), so the label survives it.
RELABEL_COMMAND = "run-command " + RELABEL_SHELL

# guestfs-tools 1.49.1 made relabelling the default for SELinux guests (commit 19de3d1c)
# and added --no-selinux-relabel; 1.48 rejects that flag. Without it a newer host whose
# appliance lacks setfiles (Debian 13) would touch /.autorelabel after our own step.
NO_RELABEL_FLAG = "--no-selinux-relabel"
NO_RELABEL_SINCE = (1, 49, 1)
_VERSION_RE = re.compile(r"(\d+)\.(\d+)\.(\d+)")


def tool_version(text: str) -> tuple[int, int, int] | None:
    """(1, 48, 2) from ``virt-builder --version`` output such as 'virt-builder 1.48.2'."""
    m = _VERSION_RE.search(text)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def builder_flags(version_text: str) -> list[str]:
    """virt-builder options that leave labelling to RELABEL_COMMAND, for this version.

    An unreadable version gets none: that is right for 1.48 (Debian 12), and a newer
    tool at worst relabels once more by itself.
    """
    version = tool_version(version_text)
    return [NO_RELABEL_FLAG] if version is not None and version >= NO_RELABEL_SINCE else []


def guestfish_quote(text: str) -> str:
    """``text`` as one double-quoted guestfish argument (backslash escapes only)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

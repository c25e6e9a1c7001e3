"""The recipe of a cached image: pure functions of a profile and the cache's inputs.

The commands file handed to virt-builder, the guest's hostname and the cache key that
names the image all come from here, so that what shapes an image and what names it
cannot drift apart. Nothing here reads a file, runs a tool or touches the network.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path

from ..config.profiles import Profile
from .selinux import RELABEL_COMMAND

# Bump when the recipe changes in a way the hashed inputs below do not show.
IMAGE_FORMAT_VERSION = 1
SSHD_SETTINGS = ("MaxSessions 64", "MaxStartups 64:30:128")
# (name, uid, gid) of the unprivileged guest user.
GuestUser = tuple[str, int, int]

# How the guest mounts /code, by the profile's share kind; the domain XML offers the
# matching device. nofail: a missing share must not drop the guest into emergency
# mode, where no sshd runs and the user would see only a boot timeout. A "sync" guest
# mounts nothing: /code is a directory of the guest user's that guest/sync.py copies into.
FSTAB_LINES = {
    "virtiofs": "/code /code virtiofs defaults,nofail 0 0",
    "9p": "/code /code 9p trans=virtio,version=9p2000.L,msize=262144,nofail 0 0",
}


def hostname(profile: Profile) -> str:
    """A valid hostname for the guest: ``devbox-<distro>`` with '.'/'_' as '-'."""
    return "devbox-" + re.sub(r"[^A-Za-z0-9-]", "-", profile.name)


def code_mount_type(line: str) -> str | None:
    """The file system type of a commands-file line that adds /code to fstab, else None."""
    op, sep, rest = line.partition(" ")
    target, colon, entry = rest.partition(":")
    if op != "append-line" or not sep or target != "/etc/fstab" or not colon:
        return None
    fields = entry.split()
    return fields[2] if len(fields) >= 3 and fields[1] == "/code" else None


def _customize_with_mount(profile: Profile) -> list[str]:
    """The profile's customize lines, with /code mounted the way its share says.

    A profile may carry its own /code fstab line (centos-7 keeps the design recipe's);
    it stands when it mounts the profile's share. A line for another share kind was
    inherited through ``extends`` from a profile with another share, and would
    mount the wrong thing: it is dropped, and the share's own line added.
    """
    lines: list[str] = []
    has_mount = False
    for line in profile.customize:
        kind = code_mount_type(line)
        if kind is not None and kind != profile.share:
            continue
        has_mount = has_mount or kind is not None
        lines.append(line)
    lines.append("mkdir /code")
    if not has_mount and profile.share in FSTAB_LINES:
        lines.append(f"append-line /etc/fstab:{FSTAB_LINES[profile.share]}")
    return lines


def commands(profile: Profile, guest_user: GuestUser, public_key: Path) -> list[str]:
    """The virt-builder commands-file lines for ``profile``, in order."""
    user, uid, gid = guest_user
    # Last: every file the build wrote (keys, users, packages) gets its SELinux label.
    relabel = [RELABEL_COMMAND] if profile.relabels else []
    # A copy, not a mount point: the guest user writes the files into it.
    own_code = [f"run-command chown {user}: /code"] if profile.share == "sync" else []
    return [
        *_customize_with_mount(profile),
        # -o: the host's uid/gid may already exist in the guest; the point is the number.
        f"run-command getent group {user} >/dev/null || groupadd -o -g {gid} {user}",
        f"run-command id -u {user} >/dev/null 2>&1 || "
        f"useradd -o -m -u {uid} -g {gid} -s /bin/bash {user}",
        *own_code,
        "mkdir /etc/sudoers.d",
        f"append-line /etc/sudoers.d/{user}:{user} ALL=(ALL) NOPASSWD:ALL",
        f"chmod 0440:/etc/sudoers.d/{user}",
        f"ssh-inject {user}:file:{public_key}",
        # Threads share one connection per login, and under software emulation a session
        # outlives its channel a while: sshd's default of 10 sessions per connection is
        # too few. MaxStartups: many logins at once (xdist workers, pasted ssh lines).
        # Appended: no stock sshd_config of ours ends in a Match block that would scope it.
        *(f"append-line /etc/ssh/sshd_config:{line}" for line in SSHD_SETTINGS),
        # Host keys made now belong to the image, so every guest booted from it
        # presents the same key and the pin per image holds.
        "run-command ssh-keygen -A",
        *relabel,
    ]


def commands_text(profile: Profile, guest_user: GuestUser, public_key: Path) -> str:
    """The commands file itself: one line per command."""
    return "\n".join(commands(profile, guest_user, public_key)) + "\n"


def key(
    profile: Profile,
    *,
    revisions: Sequence[Sequence[str]],
    guest_user: GuestUser,
    public_key_text: str,
) -> str:
    """The cache key: 16 hex digits of a sha256 over everything that shapes the image.

    ``revisions`` pins the template (every ``[uri, arch, revision, checksum]`` the
    repositories offer for it); ``public_key_text`` is the content of the key injected.
    Memory, vcpus and the accelerator shape the guest, not the image: not hashed.
    """
    inputs = {
        "format": IMAGE_FORMAT_VERSION,
        "template": profile.template,
        "revisions": [list(r) for r in revisions],
        "share": profile.share,
        "hostname": hostname(profile),
        # The commands name the key file; hash its content, not its path.
        "commands": [
            c for c in commands(profile, guest_user, Path()) if not c.startswith("ssh-inject")
        ],
        "public_key": public_key_text.strip(),
        "guest_user": list(guest_user),
        "disk_size": profile.disk_size,
        "network": profile.needs_network,
    }
    blob = json.dumps(inputs, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]

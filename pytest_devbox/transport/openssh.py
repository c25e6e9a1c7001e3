"""The OpenSSH command line that reaches a guest, for a person to paste or for `devbox
ssh`/`run` to exec: the same key, pinned host key and (for a remote host) jump as our own
paramiko connection (ssh.py), and nothing of the user's own session.

The guest runs untrusted test code as root: no agent, X display, forwarded ports or local
commands go there, whatever ~/.ssh/config says; the jump to a remote host still comes
from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

# What the line turns off: the user's config must not hand the guest their agent.
GUEST_ISOLATION = (
    "ForwardAgent=no",
    "ForwardX11=no",
    "ClearAllForwardings=yes",
    "PermitLocalCommand=no",
)


def openssh_argv(
    *,
    host: str,
    port: int,
    username: str,
    key_path: Path,
    known_hosts: Path,
    host_key_alias: str,
    via: Sequence[str] = (),
) -> list[str]:
    argv = ["ssh", *via, "-i", str(key_path), "-p", str(port)]
    for option in (
        "IdentitiesOnly=yes",
        # A list of files separated by whitespace: quoted, a path with a space is one.
        f'UserKnownHostsFile="{_quoted(_path(known_hosts))}"',
        f"HostKeyAlias={host_key_alias}",
        "StrictHostKeyChecking=yes",
        *GUEST_ISOLATION,
    ):
        argv += ["-o", option]
    return [*argv, f"{username}@{host}"]


def _path(path: Path) -> str:
    """``path`` as OpenSSH reads a file option: '%' starts a token there, '%%' is one."""
    return str(path).replace("%", "%%")


def _quoted(text: str) -> str:
    """``text`` for inside double quotes of an OpenSSH option (its argv_split escapes)."""
    return text.replace("\\", "\\\\").replace('"', '\\"')

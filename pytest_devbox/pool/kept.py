"""Records of guests `devbox up` left running, so `devbox ssh/run/destroy` find them.

A record is a small JSON file per guest, written atomically. Reading is defensive: a
corrupt record is skipped with a warning, and a record whose domain no longer runs
(destroyed, host rebooted, libvirtd restarted) is stale: it is removed, never trusted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import DevboxError
from ..host.atomic import atomic_write
from ..host.layout import CacheLayout
from ..log import Log

# What boot.host_key_alias makes: the only aliases a record may name (it is data).
_ALIAS = re.compile(r"devbox-[0-9A-Za-z._-]+")


@dataclass(frozen=True)
class KeptGuest:
    name: str
    distro: str
    uri: str
    overlay: str
    ssh: tuple[str, ...]
    # What it shares as /code: a guest of another project is not this project's guest.
    # Empty in records written before it was recorded.
    code_dir: str = ""
    # --devbox-keep-failed: the failed test whose guest this is ("" for `devbox up`'s).
    # Such a guest is evidence, not a workspace: `devbox up` and --devbox-reuse pass it by.
    failed: str = ""
    # How /code reaches it; "sync": a copy, refreshed before `devbox run` and `ssh`.
    share: str = ""

    @property
    def port(self) -> str:
        """The forwarded SSH port on 127.0.0.1, read from the ssh line ("" if none or
        not a port number)."""
        argv = list(self.ssh)
        port = argv[argv.index("-p") + 1] if "-p" in argv[:-1] else ""
        return port if port.isascii() and port.isdigit() and 0 < int(port) < 65536 else ""

    @property
    def host_key_alias(self) -> str:
        """The name its host key is pinned under, read from the ssh line ("" if none or
        not one we make)."""
        found = [a.partition("=")[2] for a in self.ssh if a.startswith("HostKeyAlias=")]
        return found[-1] if found and _ALIAS.fullmatch(found[-1]) else ""


def login_argv(guest: KeptGuest, cache_dir: Path, user: str) -> list[str]:
    """The OpenSSH command line that logs in to ``guest`` as ``user``, made afresh from
    the record's port, host key alias and URI with this cache's key and known_hosts.
    The stored ``ssh`` line is for people to read: anyone who could write a record
    could make it run anything, so it is never run."""
    from ..guest.plan import guest_connection
    from ..transport.tunnel import jump_options, parse_uri

    port, alias = guest.port, guest.host_key_alias
    if not port or not alias:
        raise DevboxError(
            f"the record of {guest.name} has no usable port and host key alias: "
            f"`devbox destroy {guest.name}` and start it again"
        )
    remote = parse_uri(guest.uri)
    via = jump_options(remote) if remote is not None else ()
    return guest_connection(cache_dir, int(port), alias, username=user, via=via).ssh_command()


def running_names(uri: str) -> list[str]:
    """Names of the devbox domains at `uri` (what `load` checks records against)."""
    from ..virt import domain as dom

    conn = dom.connect(uri)
    try:
        return [name for name, _meta in dom.list_devbox_domains(conn)]
    finally:
        conn.close()


def save(cache_dir: Path, guest: KeptGuest) -> None:
    path = CacheLayout(cache_dir).kept / f"{guest.name}.json"
    atomic_write(path, json.dumps(asdict(guest), indent=2))


def forget(cache_dir: Path, name: str) -> None:
    (CacheLayout(cache_dir).kept / f"{name}.json").unlink(missing_ok=True)


def _read(path: Path) -> KeptGuest | None:
    try:
        data = json.loads(path.read_text())
        return KeptGuest(
            name=str(data["name"]),
            distro=str(data["distro"]),
            uri=str(data["uri"]),
            overlay=str(data["overlay"]),
            ssh=tuple(str(a) for a in data["ssh"]),
            code_dir=str(data.get("code_dir", "")),
            failed=str(data.get("failed", "")),
            share=str(data.get("share", "")),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # removed meanwhile by another devbox
        return 0.0


def load(
    cache_dir: Path,
    running: Callable[[str], Iterable[str]],
    warn: Log,
) -> dict[str, KeptGuest]:
    """Live kept guests by distro (the newest wins); see `load_all`."""
    return {g.distro: g for g in load_all(cache_dir, running, warn)}


def load_all(
    cache_dir: Path,
    running: Callable[[str], Iterable[str]],
    warn: Log,
) -> list[KeptGuest]:
    """Live kept guests, oldest first. ``running(uri)`` names the devbox domains at a
    libvirt URI; records of any other guest are removed."""
    found: list[KeptGuest] = []
    live: dict[str, set[str]] = {}
    unreachable: set[str] = set()
    kept_dir = CacheLayout(cache_dir).kept
    for path in sorted(kept_dir.glob("*.json"), key=_mtime):
        guest = _read(path)
        if guest is None:
            warn(f"ignoring unreadable record {path}; remove it if it stays")
            continue
        if guest.uri not in live:
            try:
                live[guest.uri] = set(running(guest.uri))
            except DevboxError as e:
                # Unreachable now is not gone: keep the record, skip it this time.
                warn(f"cannot check the guests kept at {guest.uri}: {str(e).splitlines()[0]}")
                live[guest.uri] = set()
                unreachable.add(guest.uri)
        if guest.uri in unreachable:
            continue
        if guest.name not in live[guest.uri]:
            path.unlink(missing_ok=True)  # its guest is gone: the record is stale
            continue
        found.append(guest)
    return found

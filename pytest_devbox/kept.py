"""Records of guests `devbox up` left running, so `devbox ssh/run/destroy` find them.

A record is a small JSON file per guest, written atomically. Reading is defensive: a
corrupt record is skipped with a warning, and a record whose domain no longer runs
(destroyed, host rebooted, libvirtd restarted) is stale: it is removed, never trusted.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from .fileio import atomic_write
from .paths import CacheLayout


@dataclass(frozen=True)
class KeptGuest:
    name: str
    distro: str
    uri: str
    overlay: str
    ssh: tuple[str, ...]


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
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load(
    cache_dir: Path,
    running: Callable[[str], Iterable[str]],
    warn: Callable[[str], None],
) -> dict[str, KeptGuest]:
    """Live kept guests by distro (the newest wins). ``running(uri)`` names the devbox
    domains running at a libvirt URI; records of any other guest are removed."""
    found: dict[str, KeptGuest] = {}
    live: dict[str, set[str]] = {}
    kept_dir = CacheLayout(cache_dir).kept
    records = sorted(kept_dir.glob("*.json"), key=lambda p: p.stat().st_mtime)
    for path in records:
        guest = _read(path)
        if guest is None:
            warn(f"ignoring unreadable record {path}; remove it if it stays")
            continue
        if guest.uri not in live:
            live[guest.uri] = set(running(guest.uri))
        if guest.name not in live[guest.uri]:
            path.unlink(missing_ok=True)  # its guest is gone: the record is stale
            continue
        found[guest.distro] = guest
    return found

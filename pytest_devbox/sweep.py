"""Sweep what dead sessions left behind: their devbox domains and run directories.

Domains are transient and autodestroyed with our libvirt connection, so a leftover is
rare (libvirtd restarted, a connection that never closed); run directories holding
overlays are left by every SIGKILL. Anything whose owner process is alive, or that was
kept on purpose (--devbox-keep), is left alone.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import libvirt

from . import domain as dom


def run_dir(cache_root: Path, run_id: str) -> Path:
    """Per-session scratch (overlays, console logs), removed when the session ends."""
    return cache_root / "run" / run_id


def remove_run_dir(cache_root: Path, run_id: str) -> None:
    shutil.rmtree(run_dir(cache_root, run_id), ignore_errors=True)


def write_owner(path: Path) -> None:
    """Mark a run dir as this process's, so sweeping spares it while we live."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "owner").write_text(f"{os.getpid()}\n{socket.gethostname()}\n")


def read_owner(path: Path) -> tuple[int, str]:
    """(pid, host) of a run dir's owner; (-1, "") when unknown."""
    try:
        fields = (path / "owner").read_text().split()
        return int(fields[0]), fields[1] if len(fields) > 1 else ""
    except (OSError, ValueError, IndexError):
        return -1, ""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_dead(meta: dict[str, str]) -> bool:
    if meta.get("owner_host") not in (None, socket.gethostname()):
        return False  # another host's process: we cannot tell
    try:
        return not pid_alive(int(meta.get("owner_pid", "")))
    except ValueError:
        return False


def sweep_leftovers(uri: str, cache_dir: Path) -> list[str]:
    """Destroy devbox domains and delete run dirs whose owner is dead. Returns what it did."""
    done: list[str] = []
    kept_overlays: set[str] = set()
    conn = dom.connect(uri)
    try:
        for name, meta in dom.list_devbox_domains(conn):
            if meta.get("keep") == "1":
                kept_overlays.add(meta.get("overlay", ""))
                continue
            if meta and _owner_dead(meta):
                try:
                    conn.lookupByName(name).destroy()
                except libvirt.libvirtError:
                    continue  # gone meanwhile
                overlay = meta.get("overlay")
                if overlay:
                    Path(overlay).unlink(missing_ok=True)
                done.append(
                    f"swept leftover guest {name} (owner pid {meta.get('owner_pid')} is gone)"
                )
    finally:
        conn.close()
    runs = run_dir(cache_dir, "")
    for rdir in sorted(runs.glob("*")) if runs.is_dir() else []:
        if any(o.startswith(f"{rdir}/") for o in kept_overlays):
            continue
        pid, host = read_owner(rdir)
        if host and host != socket.gethostname():
            continue
        if pid > 0 and pid_alive(pid):
            continue
        shutil.rmtree(rdir, ignore_errors=True)
        done.append(f"removed leftover run directory {rdir}")
    return done

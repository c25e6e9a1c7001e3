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
import tempfile
import time
from pathlib import Path

import libvirt

from ..config.settings import DEFAULT_REMOTE_POOL
from ..host.layout import CacheLayout
from ..virt import domain as dom
from ..virt import volumes
from ..virt.qemu_user import is_local

# A claim in progress: a hidden directory that only gets its real name with its owner
# file inside, so a concurrent sweep never sees a run dir without an owner.
_CLAIM_PREFIX = ".claim-"
# A claim dir older than this was left by a process killed mid-claim.
_STALE_CLAIM_SECONDS = 3600.0


def remove_run_dir(cache_root: Path, run_id: str) -> None:
    shutil.rmtree(CacheLayout(cache_root).run(run_id), ignore_errors=True)


def claim_run_dir(cache_root: Path, run_id: str) -> Path:
    """This session's run dir (overlays, console logs), marked as this process's so
    sweeping spares it while we live. Created with its owner file already inside."""
    final = CacheLayout(cache_root).run(run_id)
    if read_owner(final)[0] == os.getpid():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    claim = Path(tempfile.mkdtemp(prefix=f"{_CLAIM_PREFIX}{run_id}-", dir=final.parent))
    try:
        (claim / "owner").write_text(f"{os.getpid()}\n{socket.gethostname()}\n")
        os.rename(claim, final)
    except OSError:
        # Another machine of this session made it first (ENOTEMPTY / EEXIST).
        shutil.rmtree(claim, ignore_errors=True)
        if read_owner(final)[0] != os.getpid():
            raise
    return final


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


def _stale(path: Path) -> bool:
    try:
        return time.time() - path.stat().st_mtime > _STALE_CLAIM_SECONDS
    except OSError:
        return False


def abandoned(rdir: Path) -> bool:
    """Whether run dir `rdir` outlived its owner: the process that claimed it is gone
    (on this host; another host's we cannot tell), or its claim never finished."""
    if not rdir.is_dir():
        return False  # not a run dir (the memory lock lives beside them)
    if rdir.name.startswith(_CLAIM_PREFIX) and not _stale(rdir):
        return False
    pid, host = read_owner(rdir)
    if host and host != socket.gethostname():
        return False
    return not (pid > 0 and pid_alive(pid))


def sweep_leftovers(
    uri: str, cache_dir: Path, *, remote_pool: str = DEFAULT_REMOTE_POOL
) -> list[str]:
    """Destroy devbox domains and delete run dirs whose owner is dead; on a remote `uri`,
    their volumes in our pool there too. Returns what it did."""
    done: list[str] = []
    kept_overlays: set[str] = set()
    local = is_local(uri)
    conn = dom.connect(uri)
    try:
        domains = dom.list_devbox_domains(conn)
        for name, meta in domains:
            if meta.get("keep") == "1":
                kept_overlays.add(meta.get("overlay", ""))
                continue
            if meta and _owner_dead(meta):
                try:
                    conn.lookupByName(name).destroy()
                except libvirt.libvirtError:
                    continue  # gone meanwhile
                overlay = meta.get("overlay")
                if overlay and local:  # a remote overlay is a volume: swept below
                    Path(overlay).unlink(missing_ok=True)
                done.append(
                    f"swept leftover guest {name} (owner pid {meta.get('owner_pid')} is gone)"
                )
        if not local:
            live = {n for n, _ in dom.list_devbox_domains(conn)}
            done += volumes.sweep(volumes.ensure_pool(conn, remote_pool), live, pid_alive)
    finally:
        conn.close()
    runs = CacheLayout(cache_dir).runs
    for rdir in sorted(runs.glob("*")) if runs.is_dir() else []:
        if any(o.startswith(f"{rdir}/") for o in kept_overlays) or not abandoned(rdir):
            continue
        shutil.rmtree(rdir, ignore_errors=True)
        done.append(f"removed leftover run directory {rdir}")
    return done

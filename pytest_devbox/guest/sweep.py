"""Sweep what dead sessions left behind: their devbox domains and run directories.

Domains are transient and autodestroyed with our libvirt connection, so a leftover is
rare (libvirtd restarted, a connection that never closed); run directories holding
overlays are left by every SIGKILL. Anything whose owner process is alive, or that was
kept on purpose (--devbox-keep), is left alone.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import libvirt

from ..config.settings import DEFAULT_REMOTE_POOL
from ..errors import DevboxError
from ..host import owner
from ..host.layout import CacheLayout
from ..virt import domain as dom
from ..virt import volumes
from ..virt.qemu_user import is_local

# A claim in progress: a hidden directory that only gets its real name with its owner
# file inside, so a concurrent sweep never sees a run dir without an owner.
_CLAIM_PREFIX = ".claim-"
# A claim dir older than this was left by a process killed mid-claim.
_STALE_CLAIM_SECONDS = 3600.0


# The owner file of each run dir this process claimed, open and flocked while we live:
# a sweep that can take the lock knows its owner is gone, whatever namespace or host
# (sharing the cache) the owner ran in.
_HELD: dict[Path, int] = {}
_CLAIMING = threading.Lock()


def remove_run_dir(cache_root: Path, run_id: str) -> None:
    rdir = CacheLayout(cache_root).run(run_id)
    shutil.rmtree(rdir, ignore_errors=True)
    fd = _HELD.pop(rdir, None)
    if fd is not None:
        os.close(fd)


def claim_run_dir(cache_root: Path, run_id: str) -> Path:
    """This session's run dir (overlays, console logs), marked as this process's so
    sweeping spares it while we live. Created with its owner file already inside."""
    final = CacheLayout(cache_root).run(run_id)
    with _CLAIMING:
        if final in _HELD:
            return final  # ours (or our parent's before a fork: its lock is ours too)
        return _claim(final, run_id)


def _claim(final: Path, run_id: str) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    claim = Path(tempfile.mkdtemp(prefix=f"{_CLAIM_PREFIX}{run_id}-", dir=final.parent))
    fd = -1
    try:
        fd = os.open(claim / "owner", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        me = owner.me()
        os.write(fd, f"{me.pid}\n{socket.gethostname()}\n{me.token}\n".encode())
        os.rename(claim, final)
    except OSError as e:
        # Another machine of this session made it first (ENOTEMPTY / EEXIST).
        if fd >= 0:
            os.close(fd)
        shutil.rmtree(claim, ignore_errors=True)
        raise DevboxError(
            f"cannot claim the run directory {final}: {e.strerror or e}; check that "
            "the cache directory is yours and writable"
        ) from e
    _HELD[final] = fd
    return final


def read_owner(path: Path) -> tuple[int, str]:
    """(pid, host) of a run dir's owner; (-1, "") when unknown."""
    try:
        fields = (path / "owner").read_text().split()
        return int(fields[0]), fields[1] if len(fields) > 1 else ""
    except (OSError, ValueError, IndexError):
        return -1, ""


def read_owner_token(path: Path) -> str:
    """The owner token (host/owner.py) of a run dir; "" for an old or unreadable one."""
    try:
        fields = (path / "owner").read_text().split()
    except OSError:
        return ""
    return fields[2] if len(fields) > 2 else ""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_free(owner_file: Path) -> bool:
    """Whether nobody holds the flock on a run dir's owner file (its owner ended)."""
    try:
        fd = os.open(owner_file, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False  # unreadable or gone: cannot tell
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)  # drops the lock again
    return True


def owner_dead(meta: dict[str, str]) -> bool:
    """Provably dead only: its token says so, or it claimed the run dir its overlay is
    in (same token) and no longer holds that run dir's lock."""
    token = meta.get("owner", "")
    if not token:
        return False  # an old guest: (host, pid) proves nothing
    if owner.provably_dead(token):
        return True
    rdir = Path(meta.get("overlay", "/")).parent
    return read_owner_token(rdir) == token and _lock_free(rdir / "owner")


def _stale(path: Path) -> bool:
    try:
        return time.time() - path.stat().st_mtime > _STALE_CLAIM_SECONDS
    except OSError:
        return False


def abandoned(rdir: Path) -> bool:
    """Whether run dir `rdir` provably outlived its owner: nobody holds its owner lock
    (or its owner token is provably dead), or its claim never finished."""
    if not rdir.is_dir() or rdir.is_symlink():
        return False  # not a run dir (the memory lock lives beside them)
    if rdir.name.startswith(_CLAIM_PREFIX):
        # Unfinished: abandoned once stale, unless its claimer still holds the lock.
        return _stale(rdir) and (not (rdir / "owner").exists() or _lock_free(rdir / "owner"))
    token = read_owner_token(rdir)
    if not token:
        return False  # an old owner file of (pid, host): not provably dead
    return _lock_free(rdir / "owner") or owner.provably_dead(token)


def _kept_records(cache_dir: Path) -> tuple[set[str], set[str]]:
    """(URIs, overlays) of the kept records (pool/kept.py writes them; read-only here)."""
    uris: set[str] = set()
    overlays: set[str] = set()
    kept = CacheLayout(cache_dir).kept
    for path in sorted(kept.glob("*.json")) if kept.is_dir() else []:
        try:
            record = json.loads(path.read_text())
            uris.add(str(record["uri"]))
            overlays.add(str(record.get("overlay", "")))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # pool/kept.py warns about corrupt records
    overlays.discard("")
    return uris, overlays


def _sweep_domains(uri: str, remote_pool: str, kept: set[str]) -> list[str]:
    """Destroy dead owners' domains at `uri` (and their volumes there); add the overlays
    of kept guests to `kept`."""
    done: list[str] = []
    local = is_local(uri)
    conn = dom.connect(uri)
    try:
        for name, meta in dom.list_devbox_domains(conn):
            if meta.get("keep") == "1":
                kept.add(meta.get("overlay", ""))
                continue
            if not (meta and owner_dead(meta)):
                continue
            try:
                conn.lookupByName(name).destroy()
            except libvirt.libvirtError:
                continue  # gone meanwhile
            done.append(f"swept leftover guest {name} (owner {meta.get('owner')} is gone)")
            overlay = meta.get("overlay")
            if overlay and local:  # a remote overlay is a volume: swept below
                try:
                    Path(overlay).unlink(missing_ok=True)
                except OSError as e:  # another user's run dir: theirs to remove
                    done.append(f"could not remove {name}'s overlay {overlay}: {e.strerror}")
        if not local:
            live = {n for n, _ in dom.list_devbox_domains(conn)}
            pool = volumes.ensure_pool(conn, remote_pool)
            done += volumes.sweep(pool, live, owner.provably_dead)
    finally:
        conn.close()
    return done


def sweep_leftovers(
    uris: str | Sequence[str], cache_dir: Path, *, remote_pool: str = DEFAULT_REMOTE_POOL
) -> list[str]:
    """Destroy devbox domains whose owner is provably dead at each of `uris` (on a remote
    one, their volumes in our pool there too), then delete abandoned run dirs once,
    sparing those of kept guests at any of `uris` or of a kept record's URI. Returns
    what it did."""
    record_uris, kept = _kept_records(cache_dir)
    wanted = [uris] if isinstance(uris, str) else list(uris)
    done: list[str] = []
    for uri in dict.fromkeys([*wanted, *sorted(record_uris)]):
        try:
            done += _sweep_domains(uri, remote_pool, kept)
        except DevboxError as e:
            if uri in wanted:
                raise
            # A kept record's host we cannot reach: its guests' run dirs may be kept.
            done.append(f"kept guests at {uri} not checked ({e}): no run dir removed")
            return done
    runs = CacheLayout(cache_dir).runs
    for rdir in sorted(runs.glob("*")) if runs.is_dir() else []:
        if any(o.startswith(f"{rdir}/") for o in kept) or not abandoned(rdir):
            continue
        shutil.rmtree(rdir, ignore_errors=True)
        done.append(f"removed leftover run directory {rdir}")
    return done

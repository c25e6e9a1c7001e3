"""`share = "sync"`: the code dir copied into the guest's /code over its SSH logins.

No shared file system and nothing that assumes the guest runs on this host: a tar
stream built here (tarfile, written as it is read, never whole in memory) goes into
`tar -x` in the guest over the guest user's SSH connection, so the files belong to
`devbox` with their modes, mtimes (make compares them) and symbolic links as they are.

The first sync copies every file guest/sync_files.py lists; later ones only what changed since
(by size, mtime and mode), and remove from /code the files an earlier sync copied that
are gone on the host, never a file the guest made itself. The manifest of what was
copied is kept in the guest (in the guest user's home, not in /code): every process
that attaches to the guest (a `devbox up` guest reused by pytest, pytest-xdist workers
on the controller's guest) then knows what the guest holds, and a restored guest, saved
before anything was copied, has none and gets everything.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import stat
import tarfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import paramiko

from ..config.settings import GUEST_USER
from ..errors import SyncError
from ..log import Log
from ..transport.ssh import Connection
from .sync_files import FileList, Stat, diff, list_files

CODE = "/code"
# In the guest user's home: outside /code, so `ls /code` shows the project alone.
MANIFEST = ".cache/pytest-devbox/code-sync.json"
MANIFEST_FORMAT = 1
NO_TAR = 3  # the exit status of PREPARE when the guest has neither tar nor a Python
# Python's tarfile where the guest has no tar (a minimal CentOS 7 or Fedora: @core alone
# need not hold tar). Python 2 and 3 alike; "fully_trusted" keeps Python >= 3.14 from
# refusing links that point outside /code (they are the project's own links).
_PY_EXTRACT = (
    "import sys,tarfile;"
    'kw={"filter":"fully_trusted"} if hasattr(tarfile,"fully_trusted_filter") else {};'
    'tarfile.open(fileobj=getattr(sys.stdin,"buffer",sys.stdin),mode="r|")'
    ".extractall(sys.argv[1],**kw)"
)
_PYTHONS = "python3 /usr/libexec/platform-python python2 python"


def extract_command(target: str = CODE) -> str:
    """Shell code that extracts a tar stream on stdin into `target`: tar (-p: the modes
    as sent, not masked by the umask; mtimes and links are kept anyway), else Python."""
    t = shlex.quote(target)
    return (
        f"if command -v tar >/dev/null 2>&1; then exec tar -x -p -f - -C {t}; fi; "
        f"for py in {_PYTHONS}; do command -v $py >/dev/null 2>&1 && "
        f"exec $py -c {shlex.quote(_PY_EXTRACT)} {t}; done; "
        f"echo 'neither tar nor python here' >&2; exit {NO_TAR}"
    )


# As root, once per machine: /code is the guest user's (an image made for another share
# has it root's), and something can extract into it.
PREPARE = (
    f"mkdir -p {CODE} && chown {GUEST_USER}: {CODE} && {{ "
    + " || ".join(f"command -v {p} >/dev/null 2>&1" for p in ["tar", *_PYTHONS.split()])
    + f" || exit {NO_TAR}; }}"
)
EXTRACT = extract_command()
_ERR_TAIL = 8192


@dataclass(frozen=True)
class SyncSummary:
    """What one `Machine.sync()` did."""

    files_sent: int = 0
    bytes_sent: int = 0
    files_removed: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        return (
            f"{self.files_sent} files sent ({_size(self.bytes_sent)}), "
            f"{self.files_removed} removed in {self.seconds:.1f} s"
        )


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024 / 1024:.1f} MiB"


class CodeSync:
    """Keeps one guest's /code a copy of `code_dir`; `sync()` runs one at a time."""

    def __init__(
        self,
        code_dir: Path,
        exclude: Sequence[str],
        *,
        user: Callable[[], Connection],
        root: Callable[[], Connection] | None,
        label: str,
        log: Log,
        target: str = CODE,
        manifest: str = MANIFEST,
    ) -> None:
        self.code_dir = Path(code_dir).resolve()
        self.target = target  # the guest's /code (another directory only in tests)
        self.manifest = manifest
        self.exclude = tuple(exclude)
        self._user = user
        self._root = root
        self._label = label
        self._log = log
        self._lock = threading.Lock()
        # No root login: a guest prepared by an earlier process (`devbox up`).
        self._prepared = root is None

    def sync(self) -> SyncSummary:
        """Copy what changed since the last sync; remove what is gone. Logs one line."""
        with self._lock:
            t0 = time.monotonic()
            if not self._prepared and self._root is not None:
                prepare(self._root(), self._label)
                self._prepared = True
            conn = self._user()
            previous = read_manifest(conn, self.manifest)
            now = list_files(self.code_dir, self.exclude)
            changes = diff(previous, now.files)
            if changes.remove:
                remove(conn, changes.remove, self.target)
            sent, size, vanished = send(conn, self.code_dir, changes.send, now.files, self.target)
            if not changes.empty:
                write_manifest(conn, _after(previous, now.files, vanished), self.manifest)
            summary = SyncSummary(sent, size, len(changes.remove), time.monotonic() - t0)
            self._log(f"{self._label}: synced {self.code_dir} to /code ({_source(now)}): {summary}")
            return summary


def _after(previous: dict[str, Stat], now: dict[str, Stat], vanished: set[str]) -> dict[str, Stat]:
    """What the guest holds after a sync: ``now``, but a file deleted while the sync ran
    (listed, then gone before it was read) is still the copy an earlier sync sent, if
    any: it stays in the manifest, so the next sync removes it from the guest."""
    kept = {p: s for p, s in now.items() if p not in vanished}
    kept.update({p: previous[p] for p in vanished if p in previous})
    return kept


def _source(files: FileList) -> str:
    return "git's file list" if files.source == "git" else "every file"


def prepare(root: Connection, label: str) -> None:
    """/code a directory of the guest user's, and tar in the guest (SyncError if not)."""
    r = root.run(PREPARE, check=False, cwd=None, timeout=120)
    if r.exit_status == NO_TAR:
        raise SyncError(
            f'{label}: the guest has neither tar nor Python, one of which share = "sync" '
            'needs to copy /code: add `customize = ["install tar"]` to the profile, or use '
            "a share of the host's file system"
        )
    if r.failed:
        raise SyncError(f"{label}: cannot make /code the guest user's:\n{r.tails()}")


def read_manifest(conn: Connection, manifest: str = MANIFEST) -> dict[str, Stat]:
    """What the last sync copied into this guest, {} when nothing was (or it is unreadable)."""
    r = conn.run(f"cat {shlex.quote(manifest)} 2>/dev/null || true", cwd=None, timeout=120)
    try:
        data = json.loads(r.stdout) if r.stdout.strip() else {}
        if data.get("format") != MANIFEST_FORMAT:
            return {}
        return {str(p): (int(s[0]), int(s[1]), int(s[2])) for p, s in data["files"].items()}
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return {}  # a damaged manifest: send everything again


def write_manifest(conn: Connection, files: dict[str, Stat], manifest: str = MANIFEST) -> None:
    """Record what /code holds now (after the files are there: a sync cut short sends
    them again rather than believing they arrived)."""
    text = json.dumps({"format": MANIFEST_FORMAT, "files": files}, separators=(",", ":"))
    target = shlex.quote(manifest)
    # A temporary name of this shell's own ($$): xdist workers sync one guest at once.
    new = f"{target}.new.$$"
    conn.run(
        f'mkdir -p "$(dirname {target})" && cat > {new} && mv {new} {target}',
        cwd=None,
        timeout=120,
        stdin=text.encode(),
    )


def remove(conn: Connection, paths: Sequence[str], target: str = CODE) -> None:
    """Delete `paths` from /code, then the directories that left empty (only those)."""
    conn.run("xargs -0 rm -f --", cwd=target, timeout=600, stdin=_nul_list(paths))
    parents = {str(Path(p).parent) for p in paths} - {"."}
    dirs: set[str] = set()
    for d in parents:
        while d != ".":
            dirs.add(d)
            d = str(Path(d).parent)
    if dirs:
        deepest_first = sorted(dirs, key=lambda d: (-d.count("/"), d))
        conn.run(
            "xargs -0 rmdir -- 2>/dev/null; true",
            cwd=target,
            timeout=600,
            stdin=_nul_list(deepest_first),
        )


def _nul_list(paths: Sequence[str]) -> bytes:
    return b"".join(os.fsencode(p) + b"\0" for p in paths)


class _ChannelWriter:
    """The file tarfile writes into: the channel of `tar -x`, draining its output as
    it goes (a guest tar stuck writing errors would stop reading its input)."""

    def __init__(self, channel: paramiko.Channel) -> None:
        self.channel = channel
        self.errors = bytearray()

    def write(self, data: bytes) -> int:
        self.channel.sendall(data)
        self.drain()
        return len(data)

    def drain(self) -> None:
        while self.channel.recv_stderr_ready():
            self.errors += self.channel.recv_stderr(65536)
            del self.errors[:-_ERR_TAIL]
        while self.channel.recv_ready():
            self.channel.recv(65536)


class _Exactly:
    """`size` bytes of a file that may change while it is read: cut when it grew,
    padded with zeros when it shrank (the next sync sees its new mtime and resends)."""

    def __init__(self, f: IO[bytes], size: int, path: Path) -> None:
        self._f = f
        self._left = size
        self._path = path

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        try:
            data = self._f.read(n)
        except OSError as e:
            raise SyncError(f"cannot read {self._path} to copy it into /code: {e}") from e
        data += b"\0" * (n - len(data))
        self._left -= n
        return data


def _member(name: str, entry: Stat) -> tarfile.TarInfo:
    size, mtime_ns, mode = entry
    info = tarfile.TarInfo(name)
    info.mode = stat.S_IMODE(mode)
    info.mtime = mtime_ns // 1_000_000_000
    # The pax header carries the nanoseconds (GNU tar reads them), the ustar one seconds.
    seconds, ns = divmod(mtime_ns, 1_000_000_000)
    info.pax_headers = {"mtime": f"{seconds}.{ns:09d}"}
    info.size = size
    return info


def write_tar(
    out: IO[bytes] | _ChannelWriter, code_dir: Path, names: Sequence[str], files: dict[str, Stat]
) -> tuple[int, int, set[str]]:
    """Stream `names` of `code_dir` as a tar archive into `out`; (files, bytes, vanished).

    Errors of `out` propagate as they are; a file that cannot be read is a SyncError."""
    sent = size = 0
    vanished: set[str] = set()
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        for name in names:
            path = code_dir / name
            info = _member(name, files[name])
            try:
                if stat.S_ISLNK(files[name][2]):
                    info.type, info.linkname, info.size = tarfile.SYMTYPE, os.readlink(path), 0
                    f = None
                else:
                    f = open(path, "rb")  # noqa: SIM115 - closed below, after the copy
            except FileNotFoundError:
                vanished.add(name)  # deleted since it was listed
                continue
            except OSError as e:
                raise SyncError(f"cannot read {path} to copy it into /code: {e}") from e
            if f is None:
                tar.addfile(info)
            else:
                with f:
                    tar.addfile(info, _Exactly(f, info.size, path))
                size += info.size
            sent += 1
    return sent, size, vanished


def send(
    conn: Connection,
    code_dir: Path,
    names: Sequence[str],
    files: dict[str, Stat],
    target: str = CODE,
) -> tuple[int, int, set[str]]:
    """Copy `names` into /code through `tar -x` in the guest; (files, bytes, vanished)."""
    if not names:
        return 0, 0, set()
    channel = conn.open_session()
    out = _ChannelWriter(channel)
    lost: BaseException | None = None
    try:
        channel.exec_command(EXTRACT if target == CODE else extract_command(target))
        try:
            result = write_tar(out, code_dir, names, files)
        except (OSError, EOFError, paramiko.SSHException) as e:
            lost = e  # the guest's tar went away: its status and errors say why
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            channel.shutdown_write()
        status = channel.recv_exit_status()
        out.drain()
    finally:
        channel.close()
    if status != 0 or lost is not None:
        errors = out.errors.decode("utf-8", "replace").strip() or f"{lost!r}"
        raise SyncError(f"extracting /code in the guest failed (exit status {status}):\n{errors}")
    return result

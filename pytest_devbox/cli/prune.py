"""`devbox prune`: what the cache and libvirt's log directory hold that nothing will use.

- cached images no profile uses: not the current key of a known profile (an older key
  of its distro, or a distro no profile has), with their metadata and commands file;
  and the restore saves made from such images;
- run directories of dead sessions (guest/sweep.py's owner logic), holding their overlays and
  console logs;
- libvirt's per-domain logs (and virtiofsd's) of our guests that no longer exist.

Never removed: what a running or kept guest uses (its run dir, its overlay, the save and
the image behind them), an image whose lock is held (being built) or a save whose lease
is held. Image lock files stay: removing a lock file someone may be opening would let
two builders hold "the" lock at once (filelock keeps them for the same reason).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from ..config.settings import SYSTEM_URI
from ..errors import DevboxError
from ..guest.sweep import abandoned
from ..host.layout import CacheLayout
from ..image.qemu_img import backing_file
from ..log import Log
from ..pool import kept
from ..virt.domain_xml import NAME_PREFIX

# libvirt's own log directory per URI: where it writes <domain>.log for each guest.
SYSTEM_LOG_DIR = Path("/var/log/libvirt/qemu")
_IMAGE = re.compile(r"(?P<distro>.+)-(?P<key>[0-9a-f]{16})\.(?:qcow2|json)")


@dataclass(frozen=True)
class Stale:
    """One thing to remove: its files are `paths` (dirs whole), held by `locks` meanwhile."""

    what: str  # "image", "save", "run dir", "log"
    path: Path  # what the listing names
    why: str
    paths: tuple[Path, ...]
    locks: tuple[Path, ...] = ()
    files: int = 0  # measured when found: what the summary counts
    size: int = 0  # bytes on disk (allocated: images and overlays are sparse)

    @classmethod
    def of(
        cls, what: str, path: Path, why: str, paths: tuple[Path, ...], locks: tuple[Path, ...] = ()
    ) -> Stale:
        files = [f for p in paths for f in _walk(p)]
        size = sum(_allocated(f) for f in files)
        return cls(what, path, why, paths, locks, len(files), size)


@dataclass(frozen=True)
class InUse:
    """What guests use now: the names of our domains and the disks they (or kept guests
    at other URIs) run on."""

    names: frozenset[str]
    disks: frozenset[Path] = field(default_factory=frozenset)
    # URIs whose guests could not be listed: a guest there may run on a run dir or log
    # here, so neither is removed.
    unreachable: tuple[str, ...] = ()


def _walk(path: Path) -> list[Path]:
    if path.is_dir() and not path.is_symlink():
        return [Path(d) / f for d, _, files in os.walk(path) for f in files]
    return [path] if path.exists() or path.is_symlink() else []


def _allocated(path: Path) -> int:
    try:
        st = path.lstat()
    except OSError:
        return 0
    return st.st_blocks * 512 if stat.S_ISREG(st.st_mode) else 0


def libvirt_log_dir(uri: str) -> Path | None:
    """Where libvirt at `uri` writes its per-domain logs; None when we cannot tell."""
    if uri == SYSTEM_URI:
        return SYSTEM_LOG_DIR
    if uri == "qemu:///session":
        cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(cache) / "libvirt" / "qemu" / "log"
    return None


def in_use(uris: Sequence[str], cache_dir: Path, warn: Log) -> InUse:
    """Our domains at each of `uris` (every one the project uses) and their disks, and
    the disks of kept guests anywhere. A URI that cannot be reached is skipped with a
    warning (and recorded: see `InUse.unreachable`), unless it is the only one."""
    from ..virt import domain as dom

    domains: list[tuple[str, dict[str, str]]] = []
    unreachable = []
    for uri in dict.fromkeys(uris):
        try:
            conn = dom.connect(uri)
        except DevboxError as e:
            if len(uris) == 1:
                raise
            warn(f"cannot list the guests at {uri}: {str(e).splitlines()[0]}")
            unreachable.append(uri)
            continue
        try:
            domains += dom.list_devbox_domains(conn)
        finally:
            conn.close()
    disks = {Path(m["overlay"]) for _, m in domains if m.get("overlay")}
    disks |= {Path(g.overlay) for g in kept.load_all(cache_dir, kept.running_names, warn)}
    names = frozenset(n for n, _ in domains)
    return InUse(names, frozenset(d.resolve() for d in disks), tuple(unreachable))


def find(
    cache_dir: Path,
    current: Mapping[str, str | None],
    used: InUse,
    log_dir: Path | None,
    note: Log,
    *,
    unknown: bool = False,
    project: Path | None = None,
) -> list[Stale]:
    """Everything stale. `current`: each known profile's image key (None: unknown now,
    so all of its images stay). `note` says what stays that might look stale. Images of
    distros no profile here names, and images another project than `project` (its
    rootdir) built, go only with `unknown`: the cache is per user, and another project's
    profiles are unknown to this one, even where they share a name."""
    layout = CacheLayout(cache_dir)
    stale_keys = _stale_keys(layout, current, unknown, note, project)
    saves = _stale_saves(layout, stale_keys)
    runs = _stale_runs(layout, used)
    logs = _stale_logs(log_dir, used.names, note) if log_dir is not None else []
    if used.unreachable:
        where = ", ".join(used.unreachable)
        note(f"keeping every run dir and libvirt log: which guests run at {where} is unknown")
        runs, logs = [], []
    gone = {p for s in (*saves, *runs) for p in s.paths}
    backing = _backing(layout, used, gone)
    images = _stale_images(layout, stale_keys, current, backing, note)
    return [*images, *saves, *runs, *logs]


def _stale_keys(
    layout: CacheLayout,
    current: Mapping[str, str | None],
    unknown: bool,
    note: Log,
    project: Path | None,
) -> set[tuple[str, str]]:
    found, others = set(), set()
    theirs: dict[str, str | None] = {}
    for path in sorted(layout.images.glob("*")) if layout.images.is_dir() else []:
        m = _IMAGE.fullmatch(path.name)
        if m is None:
            continue
        distro, key = m["distro"], m["key"]
        if distro in current and current[distro] in (None, key):
            continue  # its current image, or all stay
        image = layout.image(distro, key)
        if unknown:
            found.add((distro, key))
        elif distro not in current:
            others.add(distro)
        elif project is not None and (builder := _built_by(image)) not in (None, str(project)):
            theirs[image.name] = builder  # a same-named profile of another project
        else:
            found.add((distro, key))
    for distro in sorted(others):
        note(
            f"keeping every image of {distro}: no profile of this project is named so "
            "(another project's?); --unknown removes them"
        )
    for name, builder in sorted(theirs.items()):
        note(f"keeping {name}: another project's ({builder}); --unknown removes it")
    return found


def _built_by(image: Path) -> str | None:
    """The project (rootdir) that built `image`, from its metadata; None if unrecorded."""
    try:
        project = json.loads(image.with_suffix(".json").read_text()).get("project")
    except (OSError, ValueError, AttributeError):
        return None
    return str(project) if project else None


def _why_image(distro: str, current: Mapping[str, str | None]) -> str:
    if distro not in current:
        return f"no profile is named {distro}"
    return f"an older key of {distro} (now {current[distro]})"


def _stale_images(
    layout: CacheLayout,
    stale_keys: Iterable[tuple[str, str]],
    current: Mapping[str, str | None],
    backing: Mapping[Path, Path],
    note: Log,
) -> list[Stale]:
    found = []
    for distro, key in sorted(stale_keys):
        image = layout.image(distro, key)
        user = backing.get(image.resolve())
        if user is not None:
            note(f"keeping {image.name}: {user} runs on it")
            continue
        paths = (
            image,
            image.with_suffix(".json"),
            image.with_name(image.name + ".partial"),
            layout.commands_file(distro, key),
        )
        lock = image.with_name(image.name + ".lock")
        found.append(Stale.of("image", image, _why_image(distro, current), paths, (lock,)))
    return found


def _stale_saves(layout: CacheLayout, stale_keys: set[tuple[str, str]]) -> list[Stale]:
    """Save dirs whose saved guests run on a removed image (or on none left)."""
    found = []
    stale_images = {layout.image(d, k).resolve() for d, k in stale_keys}
    for sdir in sorted(layout.saves.glob("*")) if layout.saves.is_dir() else []:
        disks = sorted(sdir.glob("slot-*/disk.qcow2"))
        bases = {backing_file(d) for d in disks}
        # Only when every slot is known to be made from a removed (or missing) image.
        if not disks or not all(
            b is not None and (b in stale_images or not b.exists()) for b in bases
        ):
            continue
        locks = tuple(sorted(sdir.glob("slot-*/lease.lock")))
        found.append(Stale.of("save", sdir, "saved from an image no profile uses", (sdir,), locks))
    return found


def _stale_runs(layout: CacheLayout, used: InUse) -> list[Stale]:
    found = []
    for rdir in sorted(layout.runs.glob("*")) if layout.runs.is_dir() else []:
        if not abandoned(rdir):
            continue
        if any(d.is_relative_to(rdir.resolve()) for d in used.disks):
            continue  # a guest still runs on an overlay in it (kept, or not yet swept)
        found.append(Stale.of("run dir", rdir, "its session is gone", (rdir,)))
    return found


def _backing(layout: CacheLayout, used: InUse, gone: set[Path]) -> dict[Path, Path]:
    """image -> a disk that stays and is backed by it (directly or through a save)."""
    disks = set(used.disks)
    for root in (layout.runs, layout.saves):
        disks |= {d for d in root.glob("*/**/*.qcow2") if not any(g in d.parents for g in gone)}
    found: dict[Path, Path] = {}
    for disk in sorted(disks):
        base = backing_file(disk)
        seen = 0
        while base is not None and seen < 8:  # overlay -> save disk -> image
            found.setdefault(base, disk)
            base, seen = backing_file(base), seen + 1
    return found


def _stale_logs(log_dir: Path, names: Iterable[str], note: Log) -> list[Stale]:
    """libvirt's logs of our domains that no longer exist: <name>.log and the logs of
    their helpers (<name>-fs0-virtiofsd.log), rotated ones too."""
    if not log_dir.is_dir():
        return []
    if not os.access(log_dir, os.R_OK | os.W_OK | os.X_OK):
        note(f"skipping libvirt's logs: no permission to remove files in {log_dir}")
        return []
    live = tuple(f"{n}{sep}" for n in names for sep in (".", "-"))
    found = []
    for path in sorted(log_dir.glob(f"{NAME_PREFIX}*")):
        if path.is_file() and not path.name.startswith(live):
            found.append(Stale.of("log", path, "its guest no longer exists", (path,)))
    return found


def remove(items: Iterable[Stale], note: Log, *, dry_run: bool = False) -> list[Stale]:
    """Remove each item whose locks are all free now (with `dry_run` only check them);
    the items removed (or that would be)."""
    done = []
    for item in items:
        with ExitStack() as held:
            try:
                for lock in item.locks:
                    if dry_run and not lock.exists():
                        continue  # nobody holds it; a dry run creates no lock file
                    held.enter_context(FileLock(str(lock), timeout=0))
            except Timeout:
                note(f"keeping {item.path}: in use (its lock is held)")
                continue
            for path in () if dry_run else item.paths:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        done.append(item)
    return done


def report(items: list[Stale], *, dry_run: bool) -> list[str]:
    """One line per item (what, size, why), then the total."""
    lines = [f"{_mb(i.size):>9}  {i.what:<7}  {i.path}  ({i.why})" for i in items]
    files = sum(i.files for i in items)
    total = _mb(sum(i.size for i in items))
    if dry_run:
        lines.append(f"would remove {files} files, {total} (dry run: nothing removed)")
    else:
        lines.append(f"removed {files} files, {total} freed")
    return lines


def _mb(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


def current_keys(
    profiles: Iterable[str], key_for: Callable[[str], str], note: Log
) -> dict[str, str | None]:
    """Each profile's image key; None (its images all stay) where it cannot be worked out."""
    keys: dict[str, str | None] = {}
    for name in profiles:
        try:
            keys[name] = key_for(name)
        except DevboxError as e:
            keys[name] = None
            why = str(e).splitlines()[0]
            note(f"keeping every image of {name}: its current key is unknown ({why})")
    return keys

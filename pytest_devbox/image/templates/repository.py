"""Local virt-builder template repositories built from Debian's package mirror.

The repository directory holds the templates, a virt-builder ``index`` and a repos.d
``.conf`` pointing at it, so ``virt-builder debian-12`` works with no network but the
mirror. What a template is made of lives in image/templates/recipes.py, the tool runs that
make it in image/templates/build.py; this module decides when to build and publishes.

Every template records a *recipe* hash (suite, mirror, packages, scripts, disk size,
build-script version) in a sidecar JSON file; a template whose recipe is unchanged is
not rebuilt. Everything is written to temporary names and ``os.replace``d, so an
interrupted build never leaves a broken repository. Each distro builds under a lock of
its own, and only publishing (the index's read-modify-write) takes the repository's
lock: two templates build at the same time, from one process or several.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import filelock

from ...errors import CacheLockTimeout
from ...host.atomic import atomic_write
from ...host.layout import CacheLayout
from ...log import Log
from ..index import format_index, sections_by_name
from ..virt_builder import libguestfs_env
from .build import Steps, build_disk
from .recipes import (
    DEBIAN_SUITES,
    DEFAULT_MIRROR,
    DISK_SIZE,
    ROOT_PARTITION,
    TemplateRecipe,
    packages_for,
    recipe_hash,
    template_recipe,
)

# Re-exported: callers and tests name them through this module.
__all__ = [
    "DEBIAN_SUITES",
    "DEFAULT_MIRROR",
    "REPO_ID",
    "BuildOutcome",
    "TemplateRepo",
    "default_repo_dir",
    "next_revision",
    "packages_for",
    "recipe_hash",
]

REPO_ID = "pytest-devbox-local"


def default_repo_dir(cache_dir: Path) -> Path:
    """Where the local template repository lives inside a pytest-devbox cache."""
    return CacheLayout(cache_dir).templates


@dataclass(frozen=True)
class BuildOutcome:
    """What `TemplateRepo.build` did: ``built`` is False when it was already up to date."""

    distro: str
    built: bool
    seconds: float
    revision: int
    path: Path


def next_revision(previous: int | None, now: float | None = None) -> int:
    """A revision greater than ``previous``, and never one used before on this host.

    It is at least the current Unix time, so a repository that was deleted and built
    again does not reuse a revision that downstream caches have keyed images on.
    """
    floor = int(time.time() if now is None else now)
    return max(floor, (previous or 0) + 1)


def _sha512(path: Path) -> str:
    digest = hashlib.sha512()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class TemplateRepo:
    """A directory holding local virt-builder templates, their ``index`` and a ``.conf``."""

    def __init__(
        self,
        root: Path,
        *,
        mirror: str = DEFAULT_MIRROR,
        log: Log = print,
        env: Mapping[str, str] | None = None,
        lock_timeout: float = 3 * 3600.0,
    ) -> None:
        self.root = Path(root).absolute()
        self.mirror = mirror
        self.log = log
        self.index_path = self.root / "index"
        self.conf_path = self.root / f"{REPO_ID}.conf"
        self.uri = self.index_path.as_uri()
        self._env = env
        self._lock_timeout = lock_timeout

    def entries(self) -> dict[str, dict[str, str]]:
        """The index's sections by template name (empty when nothing is built yet)."""
        try:
            return sections_by_name(self.index_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}

    def conf_text(self) -> str:
        """The repos.d ``.conf`` for this repository: unsigned (no ``gpgkey=``), no proxy."""
        return f"[{REPO_ID}]\nuri={self.uri}\nproxy=off\n"

    def is_up_to_date(self, distro: str) -> bool:
        """True when the template exists, is intact in size, and its recipe is unchanged."""
        entry = self.entries().get(distro)
        if entry is None:
            return False
        state = self._read_state(distro)
        path = self.root / entry.get("file", "")
        try:
            size_ok = path.is_file() and path.stat().st_size == int(entry["compressed_size"])
            return (
                size_ok
                and state.get("recipe") == recipe_hash(distro, self.mirror)
                and state.get("revision") == int(entry["revision"])
            )
        except (KeyError, ValueError):
            return False

    def build(self, distro: str, *, force: bool = False) -> BuildOutcome:
        """Build (or keep) the template for ``distro`` and list it in the index.

        Returns at once with ``built=False`` when the template is up to date, unless
        ``force``. Raises UnknownDistro for names without a template recipe and
        TemplateBuildError, with the failing tool's output, when a step fails.
        """
        recipe = template_recipe(distro)
        start = time.monotonic()
        self.write_conf()
        # Index, state and template are replaced atomically, so an up-to-date template
        # is answered without waiting for a build of another distro to finish.
        if not force and self.is_up_to_date(distro):
            return self._kept(distro, start)
        lock = self._acquire(f".lock-{distro}", f"building {distro}")
        try:
            # Whoever held the lock may just have built it.
            if not force and self.is_up_to_date(distro):
                return self._kept(distro, start)
            self._remove_stale_work_dirs(distro)
            work = self.root / f".build-{distro}-{os.getpid()}"
            work.mkdir()
            try:
                revision, path = self._build(recipe, work)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            seconds = time.monotonic() - start
            self.log(f"{distro}: built revision {revision} in {seconds:.1f} s: {path}")
            return BuildOutcome(distro, True, seconds, revision, path)
        finally:
            lock.release()

    # -- internals -----------------------------------------------------------------

    def _acquire(self, name: str, doing: str) -> filelock.BaseFileLock:
        lock = filelock.FileLock(str(self.root / name), timeout=self._lock_timeout)
        try:
            lock.acquire()
        except filelock.Timeout:
            raise CacheLockTimeout(
                f"another process has been {doing} in {self.root} for over "
                f"{self._lock_timeout:g} s; wait for it, or stop it and remove {lock.lock_file}"
            ) from None
        return lock

    def _build(self, recipe: TemplateRecipe, work: Path) -> tuple[int, Path]:
        from ...host.probes import resolve_accel

        base = dict(os.environ if self._env is None else self._env)
        # An explicit LIBGUESTFS_BACKEND_SETTINGS in the caller's environment wins.
        env = {**libguestfs_env(resolve_accel() == "tcg"), **base}
        steps = Steps(recipe.distro, self.mirror, env, self.log)
        disk = build_disk(recipe, steps, work)
        return self._publish(recipe, disk)

    def _publish(self, recipe: TemplateRecipe, disk: Path) -> tuple[int, Path]:
        """Install the template ``disk`` as the next revision of ``recipe`` and list it."""
        t0 = time.monotonic()
        entry = {
            "name": recipe.title,
            "osinfo": recipe.osinfo,
            "arch": "x86_64",
            "format": "qcow2",
            "size": str(DISK_SIZE),
            "expand": ROOT_PARTITION,
            "notes": recipe.notes.format(mirror=self.mirror),
        }
        state = {"recipe": recipe_hash(recipe.distro, self.mirror)}
        published = self.publish_disk(recipe.distro, disk, entry, state)
        self.log(f"{recipe.distro}: checksum and index in {time.monotonic() - t0:.1f} s")
        return published

    def publish_disk(
        self, distro: str, disk: Path, entry: Mapping[str, str], state: Mapping[str, object]
    ) -> tuple[int, Path]:
        """Install ``disk`` (a qcow2 in this directory) as the next revision of ``distro``.

        For templates made elsewhere than from a recipe (image/cloud_import.py): ``entry``
        gives the index fields besides file, sizes, checksum and revision; ``state`` is
        recorded in the sidecar (with the revision). The caller holds ``distro``'s lock.
        """
        lock = self._acquire(".lock", "publishing a template")
        try:
            old = self.entries().get(distro, {})
            try:
                previous: int | None = int(old["revision"])
            except (KeyError, ValueError):
                previous = None
            revision = next_revision(previous)
            final = self.root / f"{distro}-r{revision}.qcow2"
            size = disk.stat().st_size
            fields = {
                **entry,
                "file": final.name,
                "compressed_size": str(size),
                "checksum[sha512]": _sha512(disk),
                "revision": str(revision),
            }
            # Template first, then the state that vouches for it, then the index that
            # publishes it: an interruption at any point leaves the old entry usable.
            os.replace(disk, final)
            atomic_write(self._state_path(distro), json.dumps({**state, "revision": revision}))
            sections = self.entries()
            sections[distro] = fields
            atomic_write(self.index_path, format_index(sections))
            if old.get("file") and old["file"] != final.name:
                (self.root / old["file"]).unlink(missing_ok=True)
            return revision, final
        finally:
            lock.release()

    def distro_lock(self, distro: str) -> filelock.BaseFileLock:
        """Take the lock a build (or an import) of ``distro`` holds; the caller releases it."""
        self.root.mkdir(parents=True, exist_ok=True)
        return self._acquire(f".lock-{distro}", f"building {distro}")

    def state(self, distro: str) -> dict[str, object]:
        """The sidecar of ``distro``'s template ({} when there is none)."""
        return self._read_state(distro)

    def _kept(self, distro: str, start: float) -> BuildOutcome:
        entry = self.entries()[distro]
        self.log(f"{distro}: template is up to date (revision {entry['revision']})")
        return BuildOutcome(
            distro,
            False,
            time.monotonic() - start,
            int(entry["revision"]),
            self.root / entry["file"],
        )

    def _state_path(self, distro: str) -> Path:
        return self.root / f"{distro}.json"

    def _read_state(self, distro: str) -> dict[str, object]:
        try:
            data = json.loads(self._state_path(distro).read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def write_conf(self) -> Path:
        """Write the repos.d ``.conf`` beside the index (``build`` does it too)."""
        self.root.mkdir(parents=True, exist_ok=True)
        text = self.conf_text()
        try:
            if self.conf_path.read_text(encoding="utf-8") == text:
                return self.conf_path
        except FileNotFoundError:
            pass
        atomic_write(self.conf_path, text)
        return self.conf_path

    def _remove_stale_work_dirs(self, distro: str) -> None:
        # We hold this distro's lock, so its work dirs left here are of builds that died.
        for stale in self.root.glob(f".build-{distro}-*"):
            shutil.rmtree(stale, ignore_errors=True)

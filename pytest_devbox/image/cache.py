"""The image cache: one customised qcow2 per profile recipe, built once by virt-builder.

``<root>/images/<distro>-<key>.qcow2`` where ``key`` hashes everything that shapes the
image (image/recipe.py). Builds run under a FileLock on a separate ``.lock`` file, write to a
temporary name in the same directory and ``os.replace`` it, so a reader never sees half
an image and a second session (or a second process of the same session) gets a cache
hit. Running virt-builder is image/virt_builder.py's job, checking qcow2 files image/qemu_img.py's.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock, Timeout

from ..config.profiles import Profile
from ..config.settings import GUEST_USER
from ..errors import CacheLockTimeout, ImageBuildError
from ..host.atomic import atomic_write
from ..host.layout import CacheLayout
from ..log import Log
from ..transport.keys import ensure_keypair
from . import qemu_img, recipe
from .index import revisions
from .virt_builder import IndexRead, VirtBuilder, executable

Revisions = list[list[str]]


@dataclass(frozen=True)
class ImageInfo:
    """A cached base image ready to be used as an overlay backing file."""

    path: Path
    key: str
    built: bool
    build_seconds: float | None
    metadata: dict[str, object]


def image_lock(image: Path) -> Path:
    """The lock file of a cached image: held while it is built, or uploaded (virt/volumes.py)."""
    return image.with_name(image.name + ".lock")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class ImageCache:
    """Builds and hands out cached base images, one per profile recipe.

    ``root`` is the cache directory. The local template repository
    ``root/templates/index`` is used automatically when it exists; ``repos`` adds
    more virt-builder repository URIs (or paths), ``public_index`` adds the public
    libguestfs index. ``guest_user`` is (name, uid, gid) of the unprivileged guest
    user, by default ``devbox`` with the uid/gid of the current host user, so files
    the guest writes into /code belong to the host user.
    """

    def __init__(
        self,
        root: Path,
        *,
        repos: Sequence[str] = (),
        public_index: bool = True,
        tcg: bool = True,
        log: Log = print,
        lock_timeout: float = 1800,
        guest_user: recipe.GuestUser | None = None,
        public_key: Path | None = None,
        project: Path | None = None,
        offline: bool = False,
    ) -> None:
        self.root = Path(root)
        # Cloud images (image/cloud_import.py): offline, never a download or a HEAD.
        self.offline = offline
        self.layout = CacheLayout(self.root)
        self.builder = VirtBuilder(self.layout, repos=repos, public_index=public_index, tcg=tcg)
        self.log = log
        self.lock_timeout = lock_timeout
        self.guest_user = guest_user or (GUEST_USER, os.getuid(), os.getgid())
        self._public_key = public_key
        # Recorded in what it builds: `devbox prune` of another project, whose profile of
        # the same name may differ, leaves such an image alone.
        self.project = project
        self._keys: dict[Profile, tuple[str, Revisions]] = {}

    # --- the key --------------------------------------------------------------------

    def public_key(self) -> Path:
        """The SSH public key injected into images (the cache's pair, created if missing)."""
        if self._public_key is None:
            private = ensure_keypair(self.layout.ssh)
            self._public_key = private.with_name(private.name + ".pub")
        return self._public_key

    def key_for(self, profile: Profile) -> str:
        """The recipe key: 16 hex digits of a sha256 over everything that shapes the image."""
        return self._key_and_sources(profile)[0]

    def _key(self, profile: Profile, sources: Revisions) -> str:
        return recipe.key(
            profile,
            revisions=sources,
            guest_user=self.guest_user,
            public_key_text=self.public_key().read_text(),
        )

    def _key_and_sources(self, profile: Profile) -> tuple[str, Revisions]:
        """The key and the template revisions it pins, worked out once per profile.

        Every index is read once (VirtBuilder remembers it). When one cannot be read,
        the key is not guessed without it: an image cached from that index whose key
        the profile still yields is used, or ImageBuildError says what to do.
        """
        if profile in self._keys:
            return self._keys[profile]
        reads = self.builder.indexes(profile)
        unreadable = [r for r in reads if r.sections is None]
        if unreadable:
            found = self._recorded_key(profile, reads)
            if found is None:
                raise ImageBuildError(self.builder.unreadable_message(profile, unreadable))
            for r in unreadable:
                self.log(
                    f"[{profile.name}] the index {r.uri} {r.problem}; using the image "
                    f"cached from it ({found[0]})"
                )
        else:
            sources = [
                rev for r in reads for rev in revisions(r.sections or (), profile.template, r.uri)
            ]
            if not sources:
                raise ImageBuildError(self.builder.missing_template_message(profile))
            found = (self._key(profile, sources), sources)
        self._keys[profile] = found
        return found

    def _recorded_key(
        self, profile: Profile, reads: Sequence[IndexRead]
    ) -> tuple[str, Revisions] | None:
        """The key of a cached image of ``profile`` that matches every index still readable.

        Its metadata records the revisions it was built from; those of the unreadable
        indexes stand in for what they cannot tell now, the readable ones are read
        afresh. The key this gives must be the image's own, so a changed profile or a
        new template revision in a readable index never matches.
        """
        name = re.compile(re.escape(profile.name) + r"-([0-9a-f]{16})\.json")
        found: list[tuple[float, str, Revisions]] = []
        for meta_path in self.layout.images.glob(f"{profile.name}-*.json"):
            match = name.fullmatch(meta_path.name)
            meta = _read_json(meta_path)
            if match is None or not isinstance(meta, dict):
                continue
            recorded = meta.get("template_sources")
            if not isinstance(recorded, list):
                continue
            sources: Revisions = []
            for r in reads:
                if r.sections is None:
                    sources += [s for s in recorded if isinstance(s, list) and s[:1] == [r.uri]]
                else:
                    sources += revisions(r.sections, profile.template, r.uri)
            key = match.group(1)
            image = self.layout.image(profile.name, key)
            if meta.get("key") == key == self._key(profile, sources) and image.is_file():
                found.append((meta_path.stat().st_mtime, key, sources))
        if not found:
            return None
        _, key, sources = max(found)
        return key, sources

    def image_path(self, profile: Profile, key: str | None = None) -> Path:
        """Where the image for ``profile`` lives (whether built or not)."""
        return self.layout.image(profile.name, key or self.key_for(profile))

    # --- building -------------------------------------------------------------------

    def builder_command(self, profile: Profile, output: Path) -> list[str]:
        """The exact virt-builder argv that builds ``profile`` into ``output``.

        Writes the commands file it refers to (``root/recipes/<distro>-<key>.commands``).
        """
        commands = self.layout.commands_file(profile.name, self.key_for(profile))
        text = recipe.commands_text(profile, self.guest_user, self.public_key())
        if not commands.is_file() or commands.read_text() != text:
            atomic_write(commands, text)
        return self.builder.argv(profile, output, commands, self.public_key())

    def _run_builder(self, profile: Profile, output: Path) -> None:
        argv = self.builder_command(profile, output)
        self.log(f"[{profile.name}] building image from template {profile.template!r}")
        self.builder.run(profile, argv, self.log)

    def image_for(self, profile: Profile, *, rebuild: bool = False) -> ImageInfo:
        """Return the cached image for ``profile``, building it first if needed."""
        executable()  # a host without virt-builder is told so before anything else
        if profile.cloud_image:
            self.import_cloud_image(profile)
        key = self.key_for(profile)
        return self.ensure(
            profile, key, lambda tmp: self._run_builder(profile, tmp), rebuild=rebuild
        )

    def import_cloud_image(self, profile: Profile) -> None:
        """Download and import ``profile``'s cloud image as its template, if not done yet.

        Once per digest, under the template's lock (a concurrent session waits, then
        finds it done). A new import is a new template revision: the key is worked out
        again from the index read afresh.
        """
        from .cloud_import import CloudImporter

        importer = CloudImporter(self.root, tcg=self.builder.tcg, log=self.log)
        outcome = importer.ensure(profile, offline=self.offline)
        if outcome.imported:
            self._keys.pop(profile, None)
            self.builder.forget(self.builder.local_index.as_uri())

    def ensure(
        self,
        profile: Profile,
        key: str,
        produce: Callable[[Path], None],
        *,
        rebuild: bool = False,
    ) -> ImageInfo:
        """The valid image of ``profile`` under ``key``, made by ``produce(tmp)`` if need be.

        ``produce`` writes the image to the temporary path it is given (image_for
        runs virt-builder); it runs under the lock, only when no valid image is cached
        (or ``rebuild``), and its output is installed with its metadata.
        """
        image = self.layout.image(profile.name, key)
        requested = time.time()
        if not rebuild:
            meta = self._cached(image, key)
            if meta is not None:
                return ImageInfo(image, key, False, None, meta)
        built_meta: dict[str, object] = {}

        def reuse() -> bool:
            # Another session may have built (or rebuilt) it while we waited.
            if rebuild and (not image.exists() or image.stat().st_mtime < requested):
                return False
            return self._cached(image, key) is not None

        def build(tmp: Path) -> None:
            start = time.monotonic()
            produce(tmp)
            built_meta.update(self._metadata(profile, key, tmp, time.monotonic() - start))
            # Metadata first: a crash before the image is in place leaves no image, so
            # the orphan metadata is harmless.
            atomic_write(image.with_suffix(".json"), json.dumps(built_meta, indent=2))

        if self._build_locked(image, build, label=profile.name, reuse=reuse):
            seconds = float(built_meta["build_seconds"])  # type: ignore[arg-type]
            self.log(f"[{profile.name}] image ready in {seconds:.0f} s: {image}")
            return ImageInfo(image, key, True, seconds, built_meta)
        meta = self._cached(image, key)
        assert meta is not None  # reuse() just said so, under the lock
        return ImageInfo(image, key, False, None, meta)

    def _metadata(self, profile: Profile, key: str, tmp: Path, seconds: float) -> dict[str, object]:
        sources = self._key_and_sources(profile)[1]
        return {
            "profile": asdict(profile),
            "key": key,
            "template": profile.template,
            "template_revision": sources[0][2] if sources else None,
            "template_sources": sources,
            "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "build_seconds": round(seconds, 1),
            "virt_builder": self.builder.version(),
            "image_format": recipe.IMAGE_FORMAT_VERSION,
            "image_size": tmp.stat().st_size,
            "project": None if self.project is None else str(self.project),
        }

    def _build_locked(
        self,
        final: Path,
        build: Callable[[Path], None],
        *,
        label: str,
        reuse: Callable[[], bool],
    ) -> bool:
        """Under ``final``'s lock: keep a valid image (``reuse()``) or build a new one.

        ``build(tmp)`` writes the image to ``tmp`` in the same directory; it is then
        ``os.replace``d to ``final``. Returns True when this call built the image.
        """
        final.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(image_lock(final)))
        owner = final.with_name(final.name + ".owner")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            holder = self._holder(owner)
            self.log(
                f"[{label}] waiting for {holder} to finish building {final.name} "
                f"(up to {self.lock_timeout:g} s)"
            )
            try:
                lock.acquire(timeout=self.lock_timeout)
            except Timeout:
                raise CacheLockTimeout(
                    f"{self._holder(owner)} held the lock on {final} for more than "
                    f"{self.lock_timeout:g} s. If that process is gone or stuck, stop it; "
                    "otherwise raise the lock timeout."
                ) from None
        try:
            since = datetime.now(timezone.utc).isoformat(timespec="seconds")
            atomic_write(
                owner,
                json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}),
            )
            if reuse():
                return False
            tmp = final.with_name(final.name + ".partial")
            if tmp.exists():
                # We hold the lock, so nobody is writing it: a killed build left it.
                self.log(f"[{label}] removing {tmp.name} left by an interrupted build")
                tmp.unlink()
            try:
                build(tmp)
                os.replace(tmp, final)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            return True
        finally:
            owner.unlink(missing_ok=True)
            lock.release()

    @staticmethod
    def _holder(owner: Path) -> str:
        info = _read_json(owner)
        try:
            return f"process {info['pid']} on {info['host']} (since {info['since']})"
        except (KeyError, TypeError):
            return "another process"

    # --- validity -------------------------------------------------------------------

    def _cached(self, image: Path, key: str) -> dict[str, object] | None:
        """Metadata of a usable cached image, or None (logging why it is not usable)."""
        if not image.is_file():
            return None
        meta_path = image.with_suffix(".json")
        meta = _read_json(meta_path)
        size = image.stat().st_size
        if isinstance(meta, dict) and meta.get("key") == key:
            if meta.get("image_size") != size:
                self.log(
                    f"{image.name}: size {size} differs from {meta.get('image_size')} "
                    "when it was built (truncated?); rebuilding"
                )
                return None
            # The size cannot tell a damaged header; 56 bytes read can.
            problem = qemu_img.header_problem(image)
            if problem:
                self.log(f"{image.name}: not a sound qcow2 header ({problem}); rebuilding")
                return None
            return meta
        # No trustworthy metadata: only a full check tells whether the image is whole.
        problem = qemu_img.check(image)
        if problem:
            self.log(f"{image.name}: qemu-img check failed, rebuilding:\n{problem}")
            return None
        recovered: dict[str, object] = {"key": key, "image_size": size, "recovered": True}
        atomic_write(meta_path, json.dumps(recovered, indent=2))
        return recovered

    def overlay(self, base: Path, dest: Path) -> Path:
        """Create a qcow2 overlay ``dest`` backed by ``base`` (which stays untouched)."""
        return qemu_img.create_overlay(base, dest)

"""The image cache: one customised qcow2 per profile recipe, built once by virt-builder.

``<root>/images/<distro>-<key>.qcow2`` where ``key`` hashes everything that shapes the
image. Builds run under a FileLock on a separate ``.lock`` file, write to a temporary
name in the same directory and ``os.replace`` it, so a reader never sees half an image
and a second session (or a second process of the same session) gets a cache hit.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock, Timeout

from .distros import Profile
from .errors import CacheLockTimeout, HostNotReady, ImageBuildError
from .fileio import atomic_write
from .keys import ensure_keypair
from .templates import default_repo_dir, index_sections

IMAGE_FORMAT_VERSION = 1
# The index libguestfs ships in /etc/virt-builder/repos.d/libguestfs.conf.
PUBLIC_INDEX = "http://builder.libguestfs.org/index.asc"
PUBLIC_INDEX_GPGKEY = Path("/etc/virt-builder/repos.d/libguestfs.gpg")

FSTAB_LINES = {
    "virtiofs": "/code /code virtiofs defaults,nofail 0 0",
    "9p": "/code /code 9p trans=virtio,version=9p2000.L,msize=262144,nofail 0 0",
}
GUEST_USER = "devbox"
_TAIL_LINES = 40
_PASSWORD_RE = re.compile(r"(random password of \S+ to )\S+", re.IGNORECASE)


@dataclass(frozen=True)
class ImageInfo:
    """A cached base image ready to be used as an overlay backing file."""

    path: Path
    key: str
    built: bool
    build_seconds: float | None
    metadata: dict[str, object]


def _redact(line: str) -> str:
    """Hide the random root password virt-builder prints."""
    return _PASSWORD_RE.sub(r"\1<hidden>", line)


def _as_uri(repo: str) -> str:
    return repo if "://" in repo else Path(repo).resolve().as_uri()


def _index_text(uri: str) -> str | None:
    """The text of a virt-builder index (file:// or http[s]://), None if unreadable."""
    try:
        if uri.startswith("file://"):
            return Path(urllib.request.url2pathname(uri[len("file://") :])).read_text()
        with urllib.request.urlopen(uri, timeout=30) as resp:
            return str(resp.read().decode("utf-8", "replace"))
    except (OSError, urllib.error.URLError, ValueError):
        return None


def parse_index(text: str) -> dict[str, list[dict[str, str]]]:
    """Parse a virt-builder index (optionally PGP clearsigned): os-version -> entries."""
    entries: dict[str, list[dict[str, str]]] = {}
    for name, fields in index_sections(text):
        entries.setdefault(name, []).append(fields)
    return entries


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
        log: Callable[[str], None] = print,
        lock_timeout: float = 1800,
        guest_user: tuple[str, int, int] | None = None,
        public_key: Path | None = None,
    ) -> None:
        self.root = Path(root)
        self.repos = tuple(_as_uri(r) for r in repos)
        self.public_index = public_index
        self.tcg = tcg
        self.log = log
        self.lock_timeout = lock_timeout
        self.guest_user = guest_user or (GUEST_USER, os.getuid(), os.getgid())
        self._public_key = public_key
        self.images_dir = self.root / "images"
        self._catalogs: dict[Path, dict[str, Any]] = {}
        self._indexes: dict[str, dict[str, list[dict[str, str]]] | None] = {}
        self._version: str | None = None

    # --- virt-builder configuration -------------------------------------------------

    @property
    def local_index(self) -> Path:
        """The project's local template repository index (built by templates.py)."""
        return default_repo_dir(self.root) / "index"

    def repo_uris(self, profile: Profile | None = None) -> list[str]:
        """The repositories virt-builder may use, in order, for ``profile``."""
        uris: list[str] = []
        if self.local_index.is_file():
            uris.append(self.local_index.as_uri())
        uris += self.repos
        if profile is not None:
            uris += [_as_uri(r) for r in profile.repos]
        if self.public_index:
            uris.append(PUBLIC_INDEX)
        return list(dict.fromkeys(uris))

    def _config_dir(self, profile: Profile | None) -> Path:
        """Write (idempotently) a virt-builder config dir holding only the wanted repos."""
        uris = self.repo_uris(profile)
        confs: dict[str, str] = {}
        for i, uri in enumerate(uris):
            if uri == PUBLIC_INDEX:
                text = f"[libguestfs.org]\nuri={uri}\n"
                if PUBLIC_INDEX_GPGKEY.is_file():
                    text += f"gpgkey={PUBLIC_INDEX_GPGKEY.as_uri()}\n"
            else:
                text = f"[devbox-{i:02d}]\nuri={uri}\n"
            confs[f"{i:02d}.conf"] = text
        # One dir per distinct repo set: concurrent sessions never rewrite each other's.
        digest = hashlib.sha256(json.dumps(sorted(confs.items())).encode()).hexdigest()[:12]
        cfg = self.root / "virt-builder-config" / digest
        repos_d = cfg / "virt-builder" / "repos.d"
        for fname, text in confs.items():
            target = repos_d / fname
            if not target.is_file() or target.read_text() != text:
                atomic_write(target, text)
        repos_d.mkdir(parents=True, exist_ok=True)
        return cfg

    def builder_env(self, profile: Profile | None = None) -> dict[str, str]:
        """Environment additions for every virt-builder run (merge into os.environ)."""
        cfg = str(self._config_dir(profile))
        env = {"VIRT_BUILDER_DIRS": cfg, "XDG_CONFIG_HOME": cfg}
        if self.tcg:
            env["LIBGUESTFS_BACKEND_SETTINGS"] = "force_tcg"
        return env

    def _virt_builder(self) -> str:
        exe = shutil.which("virt-builder")
        if exe is None:
            raise HostNotReady(
                "virt-builder is not installed: install guestfs-tools (or run scripts/setup-host)"
            )
        return exe

    def virt_builder_version(self) -> str:
        """``virt-builder --version`` output, e.g. 'virt-builder 1.48.2'."""
        if self._version is None:
            out = subprocess.run(
                [self._virt_builder(), "--version"], capture_output=True, text=True, check=False
            )
            self._version = out.stdout.strip()
        return self._version

    def _catalog(self, profile: Profile) -> dict[str, Any]:
        """``virt-builder --list --list-format json`` with our config dir (memoised)."""
        env = self.builder_env(profile)
        cfg = Path(env["VIRT_BUILDER_DIRS"])
        if cfg not in self._catalogs:
            proc = subprocess.run(
                [self._virt_builder(), "--list", "--list-format", "json"],
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                output = (proc.stdout + proc.stderr).strip()
                raise ImageBuildError(
                    "virt-builder could not read its template repositories "
                    f"({', '.join(self.repo_uris(profile)) or 'none configured'}):\n"
                    f"{output}{self._network_hint(output)}"
                )
            self._catalogs[cfg] = json.loads(proc.stdout)
        return self._catalogs[cfg]

    def _network_hint(self, output: str) -> str:
        if self.public_index and (
            "builder.libguestfs.org" in output or "Could not resolve host" in output
        ):
            return (
                "\nThe public virt-builder index is unreachable: run with --devbox-offline "
                "to use only local templates."
            )
        return ""

    def _template_revisions(self, profile: Profile) -> list[list[str]]:
        """Every (repo, arch, revision, checksum) offering the template; raise if none."""
        catalog = self._catalog(profile)
        names = {t.get("os-version") for t in catalog.get("templates", [])}
        if profile.template not in names:
            raise ImageBuildError(self._missing_template_message(profile))
        found: list[list[str]] = []
        for source in catalog.get("sources", []):
            uri = str(source.get("uri", ""))
            if uri not in self._indexes:
                text = _index_text(uri)
                try:
                    self._indexes[uri] = parse_index(text) if text is not None else None
                except ValueError:
                    self._indexes[uri] = None  # malformed: as good as unreadable
            index = self._indexes[uri]
            for entry in (index or {}).get(profile.template, []):
                found.append(
                    [
                        uri,
                        entry.get("arch", ""),
                        entry.get("revision", "1"),
                        entry.get("checksum[sha512]", entry.get("checksum", "")),
                    ]
                )
        return found

    def _missing_template_message(self, profile: Profile) -> str:
        searched = ", ".join(self.repo_uris(profile)) or "no repository"
        msg = (
            f"template {profile.template!r} (distro {profile.name!r}) is in none of the "
            f"configured virt-builder repositories; searched: {searched}."
        )
        if profile.template.startswith("debian-"):
            msg += (
                f"\nBuild it locally with `devbox template build {profile.template}` "
                f"(it lands in {self.local_index.parent})."
            )
        if not self.public_index:
            msg += (
                "\nPublic templates (centos-*, fedora-*, ubuntu-*, ...) need the public "
                "index: drop --devbox-offline."
            )
        return msg

    # --- recipe ---------------------------------------------------------------------

    def _ensure_public_key(self) -> Path:
        """The SSH public key injected into images (the cache's pair, created if missing)."""
        if self._public_key is None:
            private = ensure_keypair(self.root / "ssh")
            self._public_key = private.with_name(private.name + ".pub")
        return self._public_key

    def commands_for(self, profile: Profile) -> list[str]:
        """The virt-builder commands-file lines for ``profile``, in order."""
        user, uid, gid = self.guest_user
        pub = self._ensure_public_key()
        lines = [*profile.customize, "mkdir /code"]
        if not any("/etc/fstab:/code " in line for line in profile.customize):
            lines.append(f"append-line /etc/fstab:{FSTAB_LINES[profile.share]}")
        lines += [
            # -o: the host's uid/gid may already exist in the guest; the point is the number.
            f"run-command getent group {user} >/dev/null || groupadd -o -g {gid} {user}",
            f"run-command id -u {user} >/dev/null 2>&1 || "
            f"useradd -o -m -u {uid} -g {gid} -s /bin/bash {user}",
            "mkdir /etc/sudoers.d",
            f"append-line /etc/sudoers.d/{user}:{user} ALL=(ALL) NOPASSWD:ALL",
            f"chmod 0440:/etc/sudoers.d/{user}",
            f"ssh-inject {user}:file:{pub}",
            # Host keys made now belong to the image, so every guest booted from it
            # presents the same key and the pin per image holds.
            "run-command ssh-keygen -A",
        ]
        return lines

    @staticmethod
    def hostname_for(profile: Profile) -> str:
        """A valid hostname for the guest: ``devbox-<distro>`` with '.'/'_' as '-'."""
        return "devbox-" + re.sub(r"[^A-Za-z0-9-]", "-", profile.name)

    def key_for(self, profile: Profile) -> str:
        """The recipe key: 16 hex digits of a sha256 over everything that shapes the image."""
        pub = self._ensure_public_key()
        recipe = {
            "format": IMAGE_FORMAT_VERSION,
            "template": profile.template,
            "revisions": self._template_revisions(profile),
            "share": profile.share,
            "hostname": self.hostname_for(profile),
            # The commands name the key file; hash its content, not its path.
            "commands": [c for c in self.commands_for(profile) if not c.startswith("ssh-inject")],
            "public_key": pub.read_text().strip(),
            "guest_user": list(self.guest_user),
            "disk_size": profile.disk_size,
            "network": profile.needs_network,
        }
        blob = json.dumps(recipe, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def image_path(self, profile: Profile, key: str | None = None) -> Path:
        """Where the image for ``profile`` lives (whether built or not)."""
        return self.images_dir / f"{profile.name}-{key or self.key_for(profile)}.qcow2"

    def builder_command(self, profile: Profile, output: Path) -> list[str]:
        """The exact virt-builder argv that builds ``profile`` into ``output``.

        Writes the commands file it refers to (``root/recipes/<distro>-<key>.commands``).
        """
        key = self.key_for(profile)
        commands = self.root / "recipes" / f"{profile.name}-{key}.commands"
        text = "\n".join(self.commands_for(profile)) + "\n"
        if not commands.is_file() or commands.read_text() != text:
            atomic_write(commands, text)
        argv = [
            self._virt_builder(),
            profile.template,
            "--format",
            "qcow2",
            "-o",
            str(output),
            "--cache",
            str(self.root / "virt-builder-cache"),
            "--hostname",
            self.hostname_for(profile),
            "--ssh-inject",
            f"root:file:{self._ensure_public_key()}",
            "--root-password",
            "random",
            "--commands-from-file",
            str(commands),
        ]
        if not profile.needs_network:
            argv.append("--no-network")
        if profile.disk_size:
            argv += ["--size", profile.disk_size]
        # No --no-sync: the image is shared by every later session, so it must reach disk.
        return argv

    # --- building -------------------------------------------------------------------

    def _run_builder(self, profile: Profile, output: Path) -> None:
        argv = self.builder_command(profile, output)
        self.log(f"[{profile.name}] building image from template {profile.template!r}")
        tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        proc = subprocess.Popen(
            argv,
            env={**os.environ, **self.builder_env(profile)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        assert proc.stdout is not None
        try:
            for raw in proc.stdout:
                line = _redact(raw.rstrip("\n"))
                tail.append(line)
                self.log(f"[{profile.name}] {line}")
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if rc != 0:
            output_text = "\n".join(tail)
            hint = self._network_hint(output_text)
            if "cannot find os-version" in output_text:
                hint += "\n" + self._missing_template_message(profile)
            if "No space left on device" in output_text:
                hint += (
                    f"\nThe disk holding {self.root} is full: free some space there, or point "
                    "--devbox-cache (devbox --cache) at a larger filesystem."
                )
            raise ImageBuildError(
                f"virt-builder failed (exit {rc}) building {profile.name!r} from "
                f"{profile.template!r}.\n--- last lines of virt-builder's output ---\n"
                f"{output_text}{hint}"
            )

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
        lock = FileLock(str(final) + ".lock")
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
            atomic_write(
                owner,
                json.dumps(
                    {
                        "pid": os.getpid(),
                        "host": socket.gethostname(),
                        "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    }
                ),
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
        try:
            info = json.loads(owner.read_text())
            return f"process {info['pid']} on {info['host']} (since {info['since']})"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def _cached(self, image: Path, key: str) -> dict[str, object] | None:
        """Metadata of a usable cached image, or None (logging why it is not usable)."""
        if not image.is_file():
            return None
        meta_path = image.with_suffix(".json")
        meta: Any = None
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = None
        size = image.stat().st_size
        if isinstance(meta, dict) and meta.get("key") == key:
            if meta.get("image_size") == size:
                return meta
            self.log(
                f"{image.name}: size {size} differs from {meta.get('image_size')} "
                "when it was built (truncated?); rebuilding"
            )
            return None
        # No trustworthy metadata: only a full check tells whether the image is whole.
        problem = self._qemu_img_check(image)
        if problem:
            self.log(f"{image.name}: qemu-img check failed, rebuilding:\n{problem}")
            return None
        recovered: dict[str, object] = {"key": key, "image_size": size, "recovered": True}
        atomic_write(meta_path, json.dumps(recovered, indent=2))
        return recovered

    @staticmethod
    def _qemu_img() -> str:
        exe = shutil.which("qemu-img")
        if exe is None:
            raise HostNotReady(
                "qemu-img is missing: install qemu-utils (or run scripts/setup-host)"
            )
        return exe

    def _qemu_img_check(self, image: Path) -> str:
        """'' when ``qemu-img check`` finds the image whole, else its complaint."""
        proc = subprocess.run(
            [self._qemu_img(), "check", "-q", "-f", "qcow2", str(image)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode == 0:
            return ""
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        return "\n".join(lines[-10:]) or f"exit status {proc.returncode}"

    def image_for(self, profile: Profile, *, rebuild: bool = False) -> ImageInfo:
        """Return the cached image for ``profile``, building it first if needed."""
        key = self.key_for(profile)
        image = self.image_path(profile, key)
        requested = time.time()
        if not rebuild:
            meta = self._cached(image, key)
            if meta is not None:
                return ImageInfo(image, key, False, None, meta)
        seconds: list[float] = []
        built_meta: dict[str, object] = {}

        def reuse() -> bool:
            # Another session may have built (or rebuilt) it while we waited.
            if rebuild and (not image.exists() or image.stat().st_mtime < requested):
                return False
            return self._cached(image, key) is not None

        def build(tmp: Path) -> None:
            start = time.monotonic()
            self._run_builder(profile, tmp)
            seconds.append(round(time.monotonic() - start, 1))
            revisions = self._template_revisions(profile)
            built_meta.update(
                {
                    "profile": asdict(profile),
                    "key": key,
                    "template": profile.template,
                    "template_revision": revisions[0][2] if revisions else None,
                    "template_sources": revisions,
                    "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "build_seconds": seconds[0],
                    "virt_builder": self.virt_builder_version(),
                    "image_format": IMAGE_FORMAT_VERSION,
                    "image_size": tmp.stat().st_size,
                }
            )
            # Metadata first: a crash before the image is in place leaves no image, so
            # the orphan metadata is harmless.
            atomic_write(image.with_suffix(".json"), json.dumps(built_meta, indent=2))

        if self._build_locked(image, build, label=profile.name, reuse=reuse):
            self.log(f"[{profile.name}] image ready in {seconds[0]:.0f} s: {image}")
            return ImageInfo(image, key, True, seconds[0], built_meta)
        meta = self._cached(image, key)
        assert meta is not None  # reuse() just said so, under the lock
        return ImageInfo(image, key, False, None, meta)

    def overlay(self, base: Path, dest: Path) -> Path:
        """Create a qcow2 overlay ``dest`` backed by ``base`` (which stays untouched)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            [
                self._qemu_img(),
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                str(Path(base).resolve()),
                "-F",
                "qcow2",
                str(dest),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise ImageBuildError(
                f"qemu-img could not create overlay {dest} on {base}: "
                f"{(proc.stderr or proc.stdout).strip()}"
            )
        return dest

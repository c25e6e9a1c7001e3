"""virt-builder plumbing: which repositories, its config dir and environment, the
indexes it reads, the command line, and running it with readable failures.

virt-builder reads its repositories from ``virt-builder/repos.d`` under
``VIRT_BUILDER_DIRS`` and ``XDG_CONFIG_HOME``; pointing both at a directory we write
means it sees exactly the repositories a profile asks for, never the host's.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config.profiles import Profile
from ..errors import HostNotReady, ImageBuildError
from ..host.atomic import atomic_write
from ..host.layout import CacheLayout
from ..log import Log
from .index import Section, parse_sections
from .recipe import hostname
from .selinux import builder_flags

# The index libguestfs ships in /etc/virt-builder/repos.d/libguestfs.conf, over https as
# upstream has it since guestfs-tools commit 5a2458f3 (v1.55.1, RHEL-94873); Debian 12's
# 1.48.2 still ships http:// (builder/libguestfs.conf.in). The gpgkey= check stays.
PUBLIC_INDEX = "https://builder.libguestfs.org/index.asc"
PUBLIC_INDEX_GPGKEY = Path("/etc/virt-builder/repos.d/libguestfs.gpg")
INDEX_TIMEOUT = 30.0

_TAIL_LINES = 40
_PASSWORD_RE = re.compile(r"(random password of \S+ to )\S+", re.IGNORECASE)


def redact(line: str) -> str:
    """Hide the random root password virt-builder prints."""
    return _PASSWORD_RE.sub(r"\1<hidden>", line)


def as_uri(repo: str) -> str:
    """A repository given as a URI or a path, as a URI."""
    return repo if "://" in repo else Path(repo).resolve().as_uri()


def libguestfs_env(tcg: bool) -> dict[str, str]:
    """Environment additions for any libguestfs tool (virt-builder, guestfish)."""
    # libguestfs would try KVM and hang or abort where it does not really work.
    return {"LIBGUESTFS_BACKEND_SETTINGS": "force_tcg"} if tcg else {}


def executable() -> str:
    """The path of ``virt-builder``; HostNotReady saying what to install when missing."""
    exe = shutil.which("virt-builder")
    if exe is None:
        raise HostNotReady(
            "virt-builder is not installed: install guestfs-tools (or run scripts/setup-host)"
        )
    return exe


@dataclass(frozen=True)
class IndexRead:
    """One read of a repository's index: its sections, or why there are none."""

    uri: str
    sections: tuple[Section, ...] | None
    problem: str = ""


def read_index(uri: str, timeout: float = INDEX_TIMEOUT) -> IndexRead:
    """Download (http[s]://) or read (file://) and parse one index; never raises."""
    try:
        if uri.startswith("file://"):
            path = Path(urllib.request.url2pathname(uri[len("file://") :]))
            text = path.read_text(encoding="utf-8", errors="replace")
        else:
            with urllib.request.urlopen(uri, timeout=timeout) as resp:
                text = resp.read().decode("utf-8", "replace")
    except (OSError, urllib.error.URLError, ValueError) as e:
        return IndexRead(uri, None, f"cannot be read: {e}")
    try:
        return IndexRead(uri, tuple(parse_sections(text)))
    except ValueError as e:
        return IndexRead(uri, None, f"is not a virt-builder index: {e}")


class VirtBuilder:
    """virt-builder as one cache uses it: its repositories, config, indexes and runs.

    Each index is read once per instance, so everything derived from it in one
    session (the cache key, the metadata of a built image) agrees.
    """

    def __init__(
        self,
        layout: CacheLayout,
        *,
        repos: Sequence[str] = (),
        public_index: bool = True,
        tcg: bool = True,
    ) -> None:
        self.layout = layout
        self.repos = tuple(as_uri(r) for r in repos)
        self.public_index = public_index
        self.tcg = tcg
        self._indexes: dict[str, IndexRead] = {}
        self._version: str | None = None
        # False: only file:// indexes are read (a dry run uses no network).
        self.read_remote = True

    @property
    def local_index(self) -> Path:
        """The local template repository's index (built by image/templates/repository.py)."""
        return self.layout.templates / "index"

    def repo_uris(self, profile: Profile | None = None) -> list[str]:
        """The repositories virt-builder may use, in order, for ``profile``."""
        uris: list[str] = []
        if self.local_index.is_file():
            uris.append(self.local_index.as_uri())
        # A cloud image's template is its import, published in the local repository
        # (image/cloud_import.py): no other index may offer that name.
        if profile is not None and profile.cloud_image is not None:
            return uris
        uris += self.repos
        if profile is not None:
            uris += [as_uri(r) for r in profile.repos]
        if self.public_index:
            uris.append(PUBLIC_INDEX)
        return list(dict.fromkeys(uris))

    def config_dir(self, profile: Profile | None = None) -> Path:
        """Write (idempotently) a virt-builder config dir holding only the wanted repos."""
        confs: dict[str, str] = {}
        for i, uri in enumerate(self.repo_uris(profile)):
            if uri == PUBLIC_INDEX:
                text = f"[libguestfs.org]\nuri={uri}\n"
                if PUBLIC_INDEX_GPGKEY.is_file():
                    text += f"gpgkey={PUBLIC_INDEX_GPGKEY.as_uri()}\n"
            else:
                text = f"[devbox-{i:02d}]\nuri={uri}\n"
            confs[f"{i:02d}.conf"] = text
        # One dir per distinct repo set: concurrent sessions never rewrite each other's.
        digest = hashlib.sha256(json.dumps(sorted(confs.items())).encode()).hexdigest()[:12]
        cfg = self.layout.builder_config / digest
        repos_d = cfg / "virt-builder" / "repos.d"
        for fname, text in confs.items():
            target = repos_d / fname
            if not target.is_file() or target.read_text() != text:
                atomic_write(target, text)
        repos_d.mkdir(parents=True, exist_ok=True)
        return cfg

    def env(self, profile: Profile | None = None) -> dict[str, str]:
        """Environment additions for every virt-builder run (merge into os.environ)."""
        cfg = str(self.config_dir(profile))
        return {"VIRT_BUILDER_DIRS": cfg, "XDG_CONFIG_HOME": cfg, **libguestfs_env(self.tcg)}

    def index(self, uri: str) -> IndexRead:
        """The index at ``uri``, read on first use and remembered."""
        if uri not in self._indexes:
            if not self.read_remote and not uri.startswith("file://"):
                return IndexRead(uri, None, "was not read (no network in a dry run)")
            self._indexes[uri] = read_index(uri)
        return self._indexes[uri]

    def forget(self, uri: str) -> None:
        """Read ``uri`` afresh next time (our local index changed under us)."""
        self._indexes.pop(uri, None)

    def indexes(self, profile: Profile) -> list[IndexRead]:
        """Every index ``profile`` may be built from, in repository order."""
        return [self.index(uri) for uri in self.repo_uris(profile)]

    def version(self) -> str:
        """``virt-builder --version`` output, e.g. 'virt-builder 1.48.2'."""
        if self._version is None:
            out = subprocess.run(
                [executable(), "--version"], capture_output=True, text=True, check=False
            )
            self._version = out.stdout.strip()
        return self._version

    def argv(self, profile: Profile, output: Path, commands: Path, public_key: Path) -> list[str]:
        """The exact virt-builder argv that builds ``profile`` into ``output``."""
        argv = [
            executable(),
            profile.template,
            "--format",
            "qcow2",
            "-o",
            str(output),
            "--cache",
            str(self.layout.builder_cache),
            "--hostname",
            hostname(profile),
            "--ssh-inject",
            f"root:file:{public_key}",
            "--root-password",
            "random",
            "--commands-from-file",
            str(commands),
        ]
        if profile.relabels:
            # Our own relabel step is the commands file's last line (image/recipe.py).
            argv += builder_flags(self.version())
        if not profile.needs_network:
            argv.append("--no-network")
        if profile.disk_size:
            argv += ["--size", profile.disk_size]
        # No --no-sync: the image is shared by every later session, so it must reach disk.
        return argv

    def run(self, profile: Profile, argv: list[str], log: Log) -> None:
        """Run ``argv``, logging each output line (password hidden); raise on failure."""
        tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        proc = subprocess.Popen(
            argv,
            env={**os.environ, **self.env(profile)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        assert proc.stdout is not None
        try:
            for raw in proc.stdout:
                line = redact(raw.rstrip("\n"))
                tail.append(line)
                log(f"[{profile.name}] {line}")
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if rc != 0:
            output = "\n".join(tail)
            raise ImageBuildError(
                f"virt-builder failed (exit {rc}) building {profile.name!r} from "
                f"{profile.template!r}.\n--- last lines of virt-builder's output ---\n"
                f"{output}{self._failure_hints(profile, output)}"
            )

    def _failure_hints(self, profile: Profile, output: str) -> str:
        hint = self.network_hint(output)
        if "cannot find os-version" in output:
            hint += "\n" + self.missing_template_message(profile)
        if "No space left on device" in output:
            hint += (
                f"\nThe disk holding {self.layout.root} is full: free some space there, or "
                "point --devbox-cache (devbox --cache) at a larger filesystem."
            )
        return hint

    def network_hint(self, output: str) -> str:
        """Advice when ``output`` shows the public index was out of reach, else ''."""
        if self.public_index and (
            "builder.libguestfs.org" in output or "Could not resolve host" in output
        ):
            return (
                "\nThe public virt-builder index is unreachable: run with --devbox-offline "
                "to use only local templates."
            )
        return ""

    def missing_template_message(self, profile: Profile) -> str:
        """Why no repository offers ``profile.template``, and what to do about it."""
        searched = ", ".join(self.repo_uris(profile)) or "no repository"
        msg = (
            f"template {profile.template!r} (distro {profile.name!r}) is in none of the "
            f"configured virt-builder repositories; searched: {searched}."
        )
        if profile.template.startswith("debian-"):
            msg += (
                f"\nBuild it locally with `devbox template build {profile.template}` "
                f"(it lands in {self.layout.templates})."
            )
        if not self.public_index:
            msg += (
                "\nPublic templates (centos-*, fedora-*, ubuntu-*, ...) need the public "
                "index: drop --devbox-offline."
            )
        return msg

    def unreadable_message(self, profile: Profile, unreadable: Sequence[IndexRead]) -> str:
        """Why the key of ``profile`` cannot be known, and what to do about it."""
        lines = [
            f"cannot tell which template revision {profile.name!r} would be built from: "
            + "; ".join(f"the index {r.uri} {r.problem}" for r in unreadable)
            + f". No image of {profile.name!r} cached from these indexes matches the profile."
        ]
        if any(r.uri == PUBLIC_INDEX for r in unreadable):
            lines.append(
                "The public virt-builder index is unreachable: run with --devbox-offline "
                "to use only local templates."
            )
        if any(r.uri != PUBLIC_INDEX for r in unreadable):
            lines.append(
                "Check that the repository exists and serves a virt-builder index, or "
                "remove it from --devbox-repo or the profile's `repos`."
            )
        return "\n".join(lines)

"""A vendor's cloud image as a template of the local repository, imported once.

The image (qcow2 or raw, maybe xz) is copied to a qcow2 in the repository, inspected
with ``virt-inspector`` (its root partition becomes the index's ``expand=``), and
neutralised once, with ``virt-customize`` on the copy: an empty machine-id, no SSH host
keys (a unit makes them at boot where sshd does not: Debian, Ubuntu), cloud-init
disabled (where ds-identify does not rule it out, it waits for a datasource at every
boot), the DHCP that
cloud-init would have configured written for the image's own network stack, and a
serial console for our console logs. Then it is listed in the index like any template:
the profile's ``customize`` lines, the image cache, overlays, restore and sync apply
unchanged. The sidecar records the source URL and digest: a new image upstream means a
new revision, so a new image cache key; the same one means nothing is done at all.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..config.profiles import Profile
from ..errors import DevboxError, ImageBuildError
from ..host.layout import CacheLayout
from ..log import Log
from . import download
from .neutralise import neutralise_script
from .selinux import RELABEL_COMMAND, builder_flags
from .templates.repository import TemplateRepo, default_repo_dir
from .virt_builder import libguestfs_env

# Bump when the neutralisation (image/neutralise.py) changes: every import is redone.
IMPORT_VERSION = 1
STEP_TIMEOUT = 3600.0
DEFAULT_DISK_SIZE = 4 * 1024**3


@dataclass(frozen=True)
class Inspection:
    """What virt-inspector found: the root file system's device, and the OS."""

    root: str
    distro: str
    version: str
    product: str
    osinfo: str


@dataclass(frozen=True)
class ImportOutcome:
    """What ``ensure`` did: ``imported`` is False when the template was current."""

    template: str
    imported: bool
    revision: int
    url: str
    digest: str


def _run(argv: list[str], env: Mapping[str, str], what: str, log: Log, label: str) -> str:
    log(f"[{label}] {what} ...")
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            argv,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=STEP_TIMEOUT,
        )
    except FileNotFoundError:
        raise ImageBuildError(
            f"{argv[0]} is not installed: install guestfs-tools, qemu-utils and xz-utils "
            "(see `devbox doctor`)"
        ) from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise ImageBuildError(
            f"[{label}] {what} failed (exit {proc.returncode}): {' '.join(argv)}\n{tail}\n"
            "The template repository was left unchanged."
        )
    log(f"[{label}] {what} done in {time.monotonic() - t0:.1f} s")
    return proc.stdout


def parse_inspection(xml_text: str, source: str) -> Inspection:
    """The first operating system of ``virt-inspector``'s XML; ImageBuildError if none."""
    try:
        doc = ET.fromstring(xml_text)
    except ET.ParseError as e:
        raise ImageBuildError(f"virt-inspector gave no readable answer for {source}: {e}") from None
    os_el = doc.find("operatingsystem")
    if os_el is None or not (os_el.findtext("root") or "").strip():
        raise ImageBuildError(
            f"{source} holds no operating system libguestfs recognises: is it a bootable "
            "cloud image (qcow2 or raw)?"
        )

    def text(tag: str) -> str:
        return (os_el.findtext(tag) or "").strip() if os_el is not None else ""

    major, minor = text("major_version"), text("minor_version")
    return Inspection(
        root=text("root"),
        distro=text("distro") or text("name"),
        version=f"{major}.{minor}" if minor and minor != "0" else major,
        product=text("product_name"),
        osinfo=text("osinfo"),
    )


def expand_partition(root: str) -> str | None:
    """The partition virt-resize grows: the root's own (a btrfs subvolume's too), never
    an LV's (its PV is not known here: such a template keeps its size)."""
    m = re.fullmatch(r"(?:btrfsvol:)?/dev/[sv]da([0-9]+)(?:/.*)?", root)
    # The template's disk is the first one virt-resize sees: /dev/sda.
    return f"/dev/sda{m.group(1)}" if m else None


def _virtual_size(path: Path, env: Mapping[str, str], log: Log, label: str) -> int:
    import json

    out = _run(["qemu-img", "info", "--output=json", str(path)], env, "qemu-img info", log, label)
    return int(json.loads(out)["virtual-size"])


class CloudImporter:
    """Imports profiles' cloud images into one cache's local template repository."""

    def __init__(self, cache_dir: Path, *, tcg: bool, log: Log = print) -> None:
        self.layout = CacheLayout(cache_dir)
        self.repo = TemplateRepo(default_repo_dir(cache_dir), log=log)
        self.env = libguestfs_env(tcg)
        self.log = log

    def recorded(self, profile: Profile) -> tuple[str, str] | None:
        """(url, digest) of the current import of ``profile.template``, if it is whole."""
        entry = self.repo.entries().get(profile.template)
        state = self.repo.state(profile.template)
        cloud = state.get("cloud")
        if entry is None or not isinstance(cloud, dict):
            return None
        path = self.repo.root / entry.get("file", "")
        whole = path.is_file() and str(path.stat().st_size) == entry.get("compressed_size")
        if not whole or cloud.get("version") != IMPORT_VERSION:
            return None
        if cloud.get("neutralised") is not True or state.get("revision") != _int(entry):
            return None
        return str(cloud.get("url")), str(cloud.get("digest"))

    def ensure(self, profile: Profile, *, offline: bool = False) -> ImportOutcome:
        """``profile``'s cloud image imported as ``profile.template`` (once per digest)."""
        assert profile.cloud_image is not None
        recorded = self.recorded(profile)
        if recorded is not None and self._still_current(profile, recorded, offline):
            return self._kept(profile, recorded)
        lock = self.repo.distro_lock(profile.template)
        try:
            recorded = self.recorded(profile)  # whoever held the lock may have imported it
            if recorded is not None and self._still_current(profile, recorded, offline):
                return self._kept(profile, recorded)
            got = download.fetch(
                profile, self.layout.downloads, self.log, offline=offline, recorded=recorded
            )
            return self._import(profile, got.path, got.url, got.digest)
        finally:
            lock.release()

    def import_file(
        self, profile: Profile, path: Path, *, keep_cloud_init: bool = False
    ) -> ImportOutcome:
        """A local file as ``profile``'s template (``devbox image import``).

        The file must have the profile's digest when the profile pins one (``checksum``);
        a ``checksum_url`` is not asked for (this is the offline way in), so the file's
        own sha256 is recorded. ``keep_cloud_init`` (benchmarks/bench_cloud.py) does all
        the neutralisation but that; such an import is never taken as current by ``ensure``.
        """
        from .checksums import ChecksumMismatch, file_digest

        if not path.is_file():
            raise DevboxError(f"{path}: no such file; give the path of a qcow2 or raw image")
        digest = file_digest(path, (profile.checksum or "sha256:").split(":", 1)[0])
        if profile.checksum and digest != profile.checksum:
            raise ChecksumMismatch(
                f"{path} is not the image profile {profile.name!r} pins: expected "
                f"{profile.checksum}, got {digest}; nothing was imported"
            )
        url = profile.cloud_image or path.resolve().as_uri()
        lock = self.repo.distro_lock(profile.template)
        try:
            return self._import(profile, path, url, digest, keep_cloud_init=keep_cloud_init)
        finally:
            lock.release()

    # --- internals ----------------------------------------------------------------

    def _still_current(self, profile: Profile, recorded: tuple[str, str], offline: bool) -> bool:
        """True when the import is of the image the profile names now, by its digest (the
        URL may differ: a mirror, a new port, the latest URL serving the same file)."""
        if offline:
            return True
        if profile.checksum:
            return profile.checksum == recorded[1]
        urls = [u for u in (profile.cloud_image, profile.cloud_image_latest) if u]
        for url in urls:
            try:
                return download.expected_digest(profile, url) == recorded[1]
            except download.Gone:
                continue
            except download.DownloadError as e:
                # The vendor's server is out of reach: the image imported before stands.
                self.log(
                    f"[{profile.name}] cannot check the image upstream ({e}); using the import"
                )
                return True
        return False

    def _kept(self, profile: Profile, recorded: tuple[str, str]) -> ImportOutcome:
        entry = self.repo.entries()[profile.template]
        return ImportOutcome(profile.template, False, _int(entry), *recorded)

    def _import(
        self,
        profile: Profile,
        source: Path,
        url: str,
        digest: str,
        *,
        keep_cloud_init: bool = False,
    ) -> ImportOutcome:
        label = profile.name
        t0 = time.monotonic()
        self.repo.root.mkdir(parents=True, exist_ok=True)
        for stale in self.repo.root.glob(f".import-{profile.template}-*"):
            shutil.rmtree(stale, ignore_errors=True)  # we hold the lock: a dead import's
        work = self.repo.root / f".import-{profile.template}-{os.getpid()}"
        work.mkdir()
        try:
            disk = self._prepare(source, work, label)
            found = self._inspect(disk, label)
            self._neutralise(disk, work, label, keep_cloud_init)
            entry = {
                "name": found.product or f"{profile.name} (cloud image)",
                "osinfo": found.osinfo or f"{found.distro}{found.version}",
                "arch": "x86_64",
                "format": "qcow2",
                "size": str(_virtual_size(disk, self.env, self.log, label)),
                "notes": f"Imported by pytest-devbox from {url}\n{digest}",
            }
            expand = expand_partition(found.root)
            if expand:
                entry["expand"] = expand
            state = {
                "cloud": {
                    "url": url,
                    "digest": digest,
                    "version": IMPORT_VERSION,
                    "neutralised": not keep_cloud_init,
                    "root": found.root,
                    "os": f"{found.distro} {found.version}".strip(),
                }
            }
            revision, final = self.repo.publish_disk(profile.template, disk, entry, state)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        seconds = time.monotonic() - t0
        self.log(
            f"[{label}] imported {url} as template {profile.template!r} revision {revision} "
            f"in {seconds:.0f} s ({found.distro} {found.version}, root {found.root}): {final}"
        )
        return ImportOutcome(profile.template, True, revision, url, digest)

    def _prepare(self, source: Path, work: Path, label: str) -> Path:
        """A qcow2 copy of ``source`` in ``work`` (decompressed first if it is .xz)."""
        if source.name.endswith(".xz"):
            plain = work / "image.raw-or-qcow2"
            with open(plain, "wb") as out:
                self.log(f"[{label}] xz -d {source.name} ...")
                proc = subprocess.run(["xz", "-dc", str(source)], stdout=out, check=False)
            if proc.returncode != 0:
                raise ImageBuildError(f"[{label}] {source} is not a valid .xz file")
            source = plain
        disk = work / "disk.qcow2"
        # -O qcow2 from whatever it is (qemu-img probes raw or qcow2): the copy we change.
        _run(
            ["qemu-img", "convert", "-O", "qcow2", str(source), str(disk)],
            self.env,
            "qemu-img convert to qcow2",
            self.log,
            label,
        )
        return disk

    def _inspect(self, disk: Path, label: str) -> Inspection:
        xml_text = _run(
            ["virt-inspector", "--no-icon", "--no-applications", "-a", str(disk)],
            self.env,
            "virt-inspector",
            self.log,
            label,
        )
        return parse_inspection(xml_text, str(disk))

    def _neutralise(self, disk: Path, work: Path, label: str, keep_cloud_init: bool) -> None:
        script = work / "neutralise.sh"
        script.write_text(neutralise_script(keep_cloud_init=keep_cloud_init))
        commands = work / "neutralise.commands"
        # Last: label what the script wrote, in an SELinux guest (a no-op elsewhere).
        commands.write_text(f"run {script}\n{RELABEL_COMMAND}\n")
        version = subprocess.run(
            ["virt-customize", "--version"], capture_output=True, text=True, check=False
        ).stdout
        out = _run(
            [
                "virt-customize",
                "-a",
                str(disk),
                "--no-network",
                *builder_flags(version),
                "--commands-from-file",
                str(commands),
            ],
            self.env,
            "virt-customize: machine-id, host keys, cloud-init, network, console",
            self.log,
            label,
        )
        for line in out.splitlines():
            if "devbox-import:" in line:
                self.log(f"[{label}] {line.strip()}")


def _int(entry: Mapping[str, str]) -> int:
    try:
        return int(entry.get("revision", "0"))
    except ValueError:
        return 0

"""Local virt-builder template repositories built from Debian's package mirror.

A template is a bootable qcow2 disk made in four steps: ``mmdebstrap`` writes a
minbase root file system as a tarball, ``guestfish`` lays it on a partitioned disk
(ext4 + extlinux), ``qemu-img`` converts it to qcow2 and ``xz`` compresses it. The
repository directory then holds a virt-builder ``index`` and a repos.d ``.conf``
pointing at it, so ``virt-builder debian-12`` works with no network but the mirror.

Every template records a *recipe* hash (suite, mirror, packages, scripts, disk size,
build-script version) in a sidecar JSON file; a template whose recipe is unchanged is
not rebuilt. Everything is written to temporary names and ``os.replace``d under a
``FileLock``, so an interrupted build never leaves a broken repository.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import filelock

from .errors import CacheLockTimeout, TemplateBuildError, UnknownDistro
from .fileio import atomic_write
from .paths import CacheLayout
from .vbindex import format_index, sections_by_name

DEBIAN_SUITES: dict[str, str] = {
    "debian-11": "bullseye",
    "debian-12": "bookworm",
    "debian-13": "trixie",
}
DEFAULT_MIRROR = "http://deb.debian.org/debian"

# Bump whenever the scripts below change in a way the rendered text does not show.
BUILD_SCRIPT_VERSION = 1
REPO_ID = "pytest-devbox-local"
DISK_SIZE = 4 * 1024**3
ROOT_PARTITION = "/dev/sda1"

_OSINFO = {"debian-11": "debian11", "debian-12": "debian12", "debian-13": "debian13"}

# linux-image-amd64, not the cloud kernel: the cloud kernel lacks 9p.
PACKAGES: tuple[str, ...] = (
    "linux-image-amd64",
    "systemd-sysv",
    "udev",
    "openssh-server",
    "extlinux",
    "python3",
    "sudo",
    "iproute2",
    "dbus",
)
# From bookworm on, systemd-resolved is its own package (bullseye ships it in systemd).
_SUITE_PACKAGES: dict[str, tuple[str, ...]] = {
    "bookworm": ("systemd-resolved",),
    "trixie": ("systemd-resolved",),
}

_STEP_TIMEOUT = 3600.0

# Run by mmdebstrap on the host with the root directory as $1 (a --customize-hook).
_CUSTOMIZE_SCRIPT = r"""#!/bin/sh
set -eu
root="$1"

echo devbox > "$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tdevbox\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
    > "$root/etc/hosts"
echo 'UUID=@ROOT_UUID@ / ext4 errors=remount-ro 0 1' > "$root/etc/fstab"

# Networking without ifupdown: systemd-networkd DHCP on every wired interface.
mkdir -p "$root/etc/systemd/network"
cat > "$root/etc/systemd/network/80-devbox-dhcp.network" <<'EOF'
[Match]
Name=en* eth*

[Network]
DHCP=yes
EOF
ln -sf ../run/systemd/resolve/stub-resolv.conf "$root/etc/resolv.conf"

# Host keys are made by each guest at first boot, never shared through the template:
# Debian's ssh.service does not create missing keys, and its `sshd -t` fails without.
rm -f "$root"/etc/ssh/ssh_host_*
cat > "$root/etc/systemd/system/devbox-ssh-keygen.service" <<'EOF'
[Unit]
Description=Generate missing SSH host keys
Before=ssh.service ssh.socket
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A
RemainAfterExit=yes

[Install]
WantedBy=multi-user.target ssh.service
EOF
mkdir -p "$root/etc/ssh/sshd_config.d"
printf 'PasswordAuthentication no\nKbdInteractiveAuthentication no\n' \
    > "$root/etc/ssh/sshd_config.d/50-devbox.conf"
chroot "$root" systemctl enable systemd-networkd.service systemd-resolved.service \
    ssh.service devbox-ssh-keygen.service

# No password login: root stays locked (virt-builder sets its own root password).
chroot "$root" passwd --lock root

# Boot loader config; kernel messages and a getty on the serial console.
kver=$(cd "$root/boot" && ls vmlinuz-* | sed 's/^vmlinuz-//' | sort -V | tail -n 1)
mkdir -p "$root/boot/extlinux"
cat > "$root/boot/extlinux/extlinux.conf" <<EOF
DEFAULT linux
PROMPT 0
TIMEOUT 0
LABEL linux
  LINUX /boot/vmlinuz-$kver
  INITRD /boot/initrd.img-$kver
  APPEND root=UUID=@ROOT_UUID@ ro console=tty0 console=ttyS0,115200n8
EOF

# An empty machine-id makes systemd generate a fresh one at first boot.
: > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
"""

# guestfish script; 64bit is off because extlinux cannot boot every 64bit ext4.
_GUESTFISH_SCRIPT = """add @DISK@ format:raw
run
part-init /dev/sda mbr
part-add /dev/sda p 2048 -1
part-set-bootable /dev/sda 1 true
mkfs ext4 /dev/sda1 features:^64bit label:root
set-uuid /dev/sda1 @ROOT_UUID@
mount /dev/sda1 /
tar-in @ROOTFS@ / xattrs:true acls:true
extlinux /boot/extlinux
copy-file-to-device /usr/lib/EXTLINUX/mbr.bin /dev/sda size:440
umount-all
"""


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


def packages_for(suite: str) -> tuple[str, ...]:
    """The packages installed on top of minbase for a Debian suite."""
    return PACKAGES + _SUITE_PACKAGES.get(suite, ())


def recipe_hash(distro: str, mirror: str) -> str:
    """Hash of everything that shapes a template; a change means a rebuild."""
    suite = _suite(distro)
    recipe = {
        "distro": distro,
        "suite": suite,
        "mirror": mirror,
        "packages": packages_for(suite),
        "customize": _CUSTOMIZE_SCRIPT,
        "guestfish": _GUESTFISH_SCRIPT,
        "disk_size": DISK_SIZE,
        "version": BUILD_SCRIPT_VERSION,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def next_revision(previous: int | None, now: float | None = None) -> int:
    """A revision greater than ``previous``, and never one used before on this host.

    It is at least the current Unix time, so a repository that was deleted and built
    again does not reuse a revision that downstream caches have keyed images on.
    """
    floor = int(time.time() if now is None else now)
    return max(floor, (previous or 0) + 1)


def _suite(distro: str) -> str:
    try:
        return DEBIAN_SUITES[distro]
    except KeyError:
        known = ", ".join(sorted(DEBIAN_SUITES))
        raise UnknownDistro(
            f"no local template recipe for {distro!r}; known: {known}. "
            "Other distros come from the public virt-builder repository."
        ) from None


def _sha512(path: Path) -> str:
    digest = hashlib.sha512()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _guestfs_env(base: Mapping[str, str]) -> dict[str, str]:
    env = dict(base)
    if "LIBGUESTFS_BACKEND_SETTINGS" not in env:
        from .host import resolve_accel

        # libguestfs would try KVM and hang or abort where it does not really work.
        if resolve_accel() == "tcg":
            env["LIBGUESTFS_BACKEND_SETTINGS"] = "force_tcg"
    return env


class TemplateRepo:
    """A directory holding local virt-builder templates, their ``index`` and a ``.conf``."""

    def __init__(
        self,
        root: Path,
        *,
        mirror: str = DEFAULT_MIRROR,
        log: Callable[[str], None] = print,
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
        ``force``. Raises UnknownDistro for names not in DEBIAN_SUITES and
        TemplateBuildError, with the failing tool's output, when a step fails.
        """
        suite = _suite(distro)
        start = time.monotonic()
        self.write_conf()
        # Index, state and template are replaced atomically, so an up-to-date template
        # is answered without waiting for a build of another distro to finish.
        if not force and self.is_up_to_date(distro):
            return self._kept(distro, start)
        lock = filelock.FileLock(str(self.root / ".lock"), timeout=self._lock_timeout)
        try:
            lock.acquire()
        except filelock.Timeout:
            raise CacheLockTimeout(
                f"another process has been building templates in {self.root} for over "
                f"{self._lock_timeout:g} s; wait for it, or stop it and remove {lock.lock_file}"
            ) from None
        try:
            # Whoever held the lock may just have built it.
            if not force and self.is_up_to_date(distro):
                return self._kept(distro, start)
            self._remove_stale_work_dirs()
            work = self.root / f".build-{distro}-{os.getpid()}"
            work.mkdir()
            try:
                revision, path = self._build(distro, suite, work)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            seconds = time.monotonic() - start
            self.log(f"{distro}: built revision {revision} in {seconds:.1f} s: {path}")
            return BuildOutcome(distro, True, seconds, revision, path)
        finally:
            lock.release()

    # -- internals -----------------------------------------------------------------

    def _build(self, distro: str, suite: str, work: Path) -> tuple[int, Path]:
        env = _guestfs_env(os.environ if self._env is None else self._env)
        root_uuid = str(uuid.uuid4())
        packages = packages_for(suite)

        hook = work / "customize.sh"
        hook.write_text(_CUSTOMIZE_SCRIPT.replace("@ROOT_UUID@", root_uuid))
        hook.chmod(0o755)
        rootfs = work / "rootfs.tar"
        self._step(
            distro,
            f"mmdebstrap {suite} (minbase + {len(packages)} packages)",
            [
                "mmdebstrap",
                "--variant=minbase",
                "--include=" + ",".join(packages),
                f"--customize-hook={hook}",
                '--aptopt=Acquire::Retries "3"',
                suite,
                str(rootfs),
                self.mirror,
            ],
            env,
        )

        disk = work / "disk.raw"
        with open(disk, "wb") as f:
            f.truncate(DISK_SIZE)
        script = work / "disk.guestfish"
        script.write_text(
            _GUESTFISH_SCRIPT.replace("@DISK@", str(disk))
            .replace("@ROOTFS@", str(rootfs))
            .replace("@ROOT_UUID@", root_uuid)
        )
        self._step(
            distro,
            "guestfish: partition, ext4, extlinux",
            ["guestfish", "-x", "-f", str(script)],
            env,
        )
        rootfs.unlink()

        qcow2 = work / "disk.qcow2"
        self._step(
            distro,
            "qemu-img convert to qcow2",
            ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(disk), str(qcow2)],
            env,
        )
        disk.unlink()
        # 16 MiB blocks let virt-builder decompress in parallel; -T0 uses every core.
        self._step(
            distro,
            "xz compress",
            # -1: the repository is local, so speed beats ratio; the default -6 spent
            # over half of each build compressing (185-265 s of 340-480 s measured).
            ["xz", "-1", "--block-size=16777216", "-T0", "-f", str(qcow2)],
            env,
        )
        compressed = work / "disk.qcow2.xz"

        t0 = time.monotonic()
        old = self.entries().get(distro, {})
        try:
            previous: int | None = int(old["revision"])
        except (KeyError, ValueError):
            previous = None
        revision = next_revision(previous)
        final = self.root / f"{distro}-r{revision}.qcow2.xz"
        entry = {
            "name": f"Debian {distro.split('-')[1]} ({suite}), pytest-devbox local build",
            "osinfo": _OSINFO[distro],
            "arch": "x86_64",
            "file": final.name,
            "format": "qcow2",
            "size": str(DISK_SIZE),
            "compressed_size": str(compressed.stat().st_size),
            "checksum[sha512]": _sha512(compressed),
            "revision": str(revision),
            "expand": ROOT_PARTITION,
            "notes": (
                f"Debian {suite} minbase from {self.mirror}, built by pytest-devbox.\n"
                "systemd-networkd DHCP, sshd with host keys made at first boot,\n"
                "serial console on ttyS0, root locked."
            ),
        }
        # Template first, then the state that vouches for it, then the index that
        # publishes it: an interruption at any point leaves the old entry usable.
        os.replace(compressed, final)
        atomic_write(
            self._state_path(distro),
            json.dumps({"recipe": recipe_hash(distro, self.mirror), "revision": revision}),
        )
        sections = self.entries()
        sections[distro] = entry
        atomic_write(self.index_path, format_index(sections))
        if old.get("file") and old["file"] != final.name:
            (self.root / old["file"]).unlink(missing_ok=True)
        self.log(f"{distro}: checksum and index in {time.monotonic() - t0:.1f} s")
        return revision, final

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

    def _step(self, distro: str, title: str, argv: Sequence[str], env: Mapping[str, str]) -> None:
        self.log(f"{distro}: {title} ...")
        t0 = time.monotonic()
        try:
            proc = subprocess.run(
                list(argv),
                env=dict(env),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=_STEP_TIMEOUT,
            )
        except FileNotFoundError:
            raise TemplateBuildError(
                f"{argv[0]} is not installed; install the host packages listed by "
                "`devbox doctor` (mmdebstrap, guestfs-tools, qemu-utils, xz-utils)"
            ) from None
        except subprocess.TimeoutExpired as exc:
            raise TemplateBuildError(
                f"{distro}: {title} did not finish in {_STEP_TIMEOUT:g} s; "
                f"check the mirror {self.mirror} and the host load, then retry"
            ) from exc
        seconds = time.monotonic() - t0
        if proc.returncode != 0:
            output = _tail(proc.stdout + "\n" + proc.stderr)
            raise TemplateBuildError(
                f"{distro}: {title} failed (exit {proc.returncode}) after {seconds:.0f} s: "
                f"{' '.join(argv)}\n{output}\n"
                "Fix the cause above and run `devbox template build` again; "
                "the repository was left unchanged."
            )
        self.log(f"{distro}: {title} done in {seconds:.1f} s")

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

    def _remove_stale_work_dirs(self) -> None:
        # We hold the lock, so any work dir left here belongs to a build that died.
        for stale in self.root.glob(".build-*"):
            shutil.rmtree(stale, ignore_errors=True)

"""A vendor-like cloud image mirror on 127.0.0.1, for the cloud-image tests and benchmark.

The image is made the way Debian makes its genericcloud images (debian-cloud-images,
config_space/bookworm/package_config/SYSTEM_BOOT and scripts/LAST/10-cleanup, read in
its GitHub copy GoCarrot/debian-cloud-images): trixie with cloud-init ENABLED and
`linux-image-cloud-amd64`, netplan.io for systemd-networkd (cloud-init writes the
netplan file), no SSH host keys, an empty machine-id and hostname. It goes through our
own template steps (image/templates/build.py: mmdebstrap, guestfish, qemu-img) and is
built once into the shared cache, keyed by its recipe, because it takes minutes.

`MirrorServer` serves a directory like a vendor's: the image plus SHA256SUMS (Ubuntu's
`hex *name`), SHA512SUMS (Debian's `hex  name`) and CHECKSUM (Rocky's BSD style). It
honours HTTP Range, counts what it served, can drop the connection part-way through a
body (to prove resume), ignore Range, or answer 404/410 for a path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import filelock

from pytest_devbox.host.layout import default_cache_dir
from pytest_devbox.host.probes import resolve_accel
from pytest_devbox.image.templates.build import Steps, build_disk
from pytest_devbox.image.templates.recipes import DEFAULT_MIRROR, TemplateRecipe
from pytest_devbox.image.virt_builder import libguestfs_env

IMAGE_NAME = "debian-13-genericcloud-amd64.qcow2"

# What Debian's cloud images install on top of minbase that matters here (SYSTEM_BOOT,
# CLOUD): the cloud kernel, cloud-init, netplan for systemd-networkd, resolved, sshd.
PACKAGES = (
    "linux-image-cloud-amd64",
    "systemd-sysv",
    "udev",
    "openssh-server",
    "extlinux",
    "cloud-init",
    "netplan.io",
    "systemd-resolved",
    "python3",
    "sudo",
    "iproute2",
    "dbus",
)

# The mmdebstrap hook: a bootable disk, then the vendor's cleanup (10-cleanup). Network
# comes only from cloud-init, as in the vendor's image: no netplan file of our own.
CUSTOMIZE = r"""#!/bin/sh
set -eu
root="$1"
printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' > "$root/etc/hosts"
echo 'UUID=@ROOT_UUID@ / ext4 errors=remount-ro 0 1' > "$root/etc/fstab"
ln -sf ../run/systemd/resolve/stub-resolv.conf "$root/etc/resolv.conf"
chroot "$root" systemctl enable systemd-networkd.service systemd-resolved.service ssh.service
chroot "$root" passwd --lock root
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
rm -f "$root"/etc/ssh/ssh_host_* "$root/var/lib/dbus/machine-id"
: > "$root/etc/machine-id"
: > "$root/etc/hostname"
"""

GUESTFISH = """add @DISK@ format:raw
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

RECIPE = TemplateRecipe(
    distro="debian-13-genericcloud",
    suite="trixie",
    osinfo="debian13",
    packages=PACKAGES,
    customize=CUSTOMIZE,
    guestfish=GUESTFISH,
    title="Debian 13 genericcloud-like image (tests)",
    notes="",
)


def recipe_key(mirror: str = DEFAULT_MIRROR) -> str:
    blob = json.dumps({**dataclasses.asdict(RECIPE), "mirror": mirror}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def vendor_image(cache: Path | None = None, log: object = print) -> Path:
    """The vendor-like qcow2, built once per recipe into ``cache``/vendor-mirror/KEY/."""
    root = (cache or default_cache_dir()) / "vendor-mirror" / recipe_key()
    image = root / IMAGE_NAME
    if image.is_file():
        return image
    root.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(root / ".lock")):
        if image.is_file():
            return image
        work = root / f".build-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        try:
            env = {**os.environ, **libguestfs_env(resolve_accel() == "tcg")}
            steps = Steps(RECIPE.distro, DEFAULT_MIRROR, env, log)  # type: ignore[arg-type]
            qcow2 = build_disk(RECIPE, steps, work)
            os.replace(qcow2, image)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return image


def digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def publish(image: Path, directory: Path) -> dict[str, str]:
    """``directory`` as a vendor's: the image (hard-linked when it can be) and its
    checksum files in three vendors' formats. Returns {"sha256": hex, "sha512": hex}."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / image.name
    if not target.exists():
        try:
            os.link(image, target)
        except OSError:
            shutil.copy2(image, target)
    sums = {"sha256": digest(image, "sha256"), "sha512": digest(image, "sha512")}
    name = image.name
    (directory / "SHA256SUMS").write_text(f"{sums['sha256']} *{name}\n")
    (directory / "SHA512SUMS").write_text(f"{sums['sha512']}  {name}\n")
    (directory / "CHECKSUM").write_text(f"# {name}: 1 bytes\nSHA256 ({name}) = {sums['sha256']}\n")
    return sums


@dataclasses.dataclass
class Faults:
    """What the server does wrong, changeable while it runs."""

    drop_after: int | None = None  # bytes of a body sent before the connection is cut
    drops_left: int = 0  # how many responses longer than that are cut
    ignore_range: bool = False
    stall_after: int | None = None  # bytes of a body sent before the server stops sending
    stall: threading.Event = dataclasses.field(default_factory=threading.Event)  # set: stalled
    status: dict[str, int] = dataclasses.field(default_factory=dict)  # path -> 404/410


class MirrorServer:
    """Serves ``directory`` on 127.0.0.1 with Range support; counts GETs and body bytes."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.faults = Faults()
        self.gets: dict[str, int] = {}
        self.ranges: list[str] = []
        self.sent: dict[str, int] = {}
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _serve(self, body: bool) -> None:
                name = self.path.split("?", 1)[0].lstrip("/")
                with outer._lock:
                    if body:
                        outer.gets[name] = outer.gets.get(name, 0) + 1
                    status = outer.faults.status.get(name)
                path = outer.directory / name
                if status is None and (not name or "/" in name or not path.is_file()):
                    status = 404
                if status is not None:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                size = path.stat().st_size
                start = 0
                asked = self.headers.get("Range")
                if body and asked:
                    outer.ranges.append(asked)
                if asked and not outer.faults.ignore_range and asked.startswith("bytes="):
                    first = asked[len("bytes=") :].split("-", 1)[0]
                    start = int(first) if first.isdigit() else 0
                if start >= size > 0:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
                self.send_header("Content-Length", str(size - start))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if body:
                    self._body(name, path, start)

            def _body(self, name: str, path: Path, start: int) -> None:
                remaining = path.stat().st_size - start
                with outer._lock:
                    cut = outer.faults.drop_after if outer.faults.drops_left > 0 else None
                    if cut is not None and cut < remaining:
                        outer.faults.drops_left -= 1
                    else:  # a body shorter than the cut (a checksum file) is sent whole
                        cut = None
                sent = 0
                with open(path, "rb") as f:
                    f.seek(start)
                    while True:
                        block = f.read(1 << 16)
                        if not block:
                            break
                        if cut is not None and sent + len(block) > cut:
                            block = block[: cut - sent]
                        try:
                            self.wfile.write(block)
                        except OSError:
                            break
                        sent += len(block)
                        if cut is not None and sent >= cut:
                            break
                        stall_at = outer.faults.stall_after
                        if stall_at is not None and sent >= stall_at:
                            # Hold the connection open, sending nothing: a client killed
                            # now leaves its partial file behind.
                            outer.faults.stall.set()
                            while outer.faults.stall_after is not None:
                                time.sleep(0.05)
                with outer._lock:
                    outer.sent[name] = outer.sent.get(name, 0) + sent
                if cut is not None:
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.wfile.flush()
                        self.connection.shutdown(2)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    def url(self, name: str) -> str:
        return self.base + name


@contextlib.contextmanager
def serve(directory: Path) -> Iterator[MirrorServer]:
    """A MirrorServer running for the duration of the block."""
    server = MirrorServer(directory)
    thread = threading.Thread(target=server.httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
        thread.join()


if __name__ == "__main__":
    print(vendor_image())

"""qcow2 files: a cheap header check, ``qemu-img check`` and overlays on a base image."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

from ..errors import HostNotReady, ImageBuildError

QCOW2_MAGIC = b"QFI\xfb"
# magic, version, backing file offset and size, cluster bits, virtual size,
# encryption, L1 size, L1 table offset, refcount table offset: the first 56 bytes.
_HEADER = struct.Struct(">4sIQIIQIIQQ")
CHECK_TIMEOUT = 120.0


def executable() -> str:
    """The path of ``qemu-img``; HostNotReady saying what to install when missing."""
    exe = shutil.which("qemu-img")
    if exe is None:
        raise HostNotReady("qemu-img is missing: install qemu-utils (or run scripts/setup-host)")
    return exe


def header_problem(image: Path) -> str:
    """'' when ``image`` starts with a sane qcow2 header, else what is wrong with it.

    Reads 56 bytes, so it runs on every cache hit: a file of the right size whose
    header was zeroed or overwritten is caught here without ``qemu-img``.
    """
    try:
        with open(image, "rb") as f:
            head = f.read(_HEADER.size)
        size = image.stat().st_size
    except OSError as e:
        return f"cannot read it: {e}"
    if len(head) < _HEADER.size:
        return f"only {len(head)} bytes: too short for a qcow2 header"
    magic, version, _, _, cluster_bits, virtual_size, _, _, l1_offset, refcount_offset = (
        _HEADER.unpack(head)
    )
    if magic != QCOW2_MAGIC:
        return f"no qcow2 magic (starts with {magic!r}, not {QCOW2_MAGIC!r})"
    if version not in (2, 3):
        return f"qcow2 version {version}, expected 2 or 3"
    if not 9 <= cluster_bits <= 21:
        return f"cluster bits {cluster_bits} out of range 9..21"
    if virtual_size == 0:
        return "a virtual size of 0"
    cluster = 1 << cluster_bits
    for what, offset in (("L1 table", l1_offset), ("refcount table", refcount_offset)):
        if offset == 0 or offset % cluster or offset >= size:
            return f"{what} offset {offset} is not a cluster inside the file ({size} bytes)"
    return ""


def virtual_size(image: Path) -> int:
    """The disk size a qcow2 image shows its guest, from its header."""
    with open(image, "rb") as f:
        size: int = _HEADER.unpack(f.read(_HEADER.size))[5]
    return size


def backing_file(image: Path) -> Path | None:
    """The backing file a qcow2 header names (resolved against the image's folder, as
    QEMU does), or None: no backing file, or not a readable qcow2 file."""
    try:
        with open(image, "rb") as f:
            head = f.read(_HEADER.size)
            if len(head) < _HEADER.size:
                return None
            magic, _, offset, size = _HEADER.unpack(head)[:4]
            if magic != QCOW2_MAGIC or offset == 0 or not 0 < size <= 4096:
                return None
            f.seek(offset)
            name = f.read(size).decode("utf-8", "replace")
    except OSError:
        return None
    return (image.parent / name).resolve()


def check(image: Path, timeout: float = CHECK_TIMEOUT) -> str:
    """'' when ``qemu-img check`` finds the image whole, else its complaint.

    It walks every table of the image: slower than :func:`header_problem`, for when
    there is nothing better to trust. An image it cannot judge in ``timeout``
    seconds counts as damaged, since the cache can always build it again.
    """
    try:
        proc = subprocess.run(
            [executable(), "check", "-q", "-f", "qcow2", str(image)],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return f"qemu-img check did not finish in {timeout:g} s"
    if proc.returncode == 0:
        return ""
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return "\n".join(lines[-10:]) or f"exit status {proc.returncode}"


def create_overlay(base: Path, dest: Path) -> Path:
    """Create a qcow2 overlay ``dest`` backed by ``base`` (which stays untouched)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [
            executable(),
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

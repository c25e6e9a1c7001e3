"""A cache directory a Pool on libvirt's test:///default driver can get far with, fast.

It holds a local template index naming debian-12 and a small but sound cached image under
the key the Pool computes for that profile, so a start goes past the image cache and
stops where the test driver stops it (it refuses AUTODESTROY; without it, it has no QEMU
monitor to forward a port). No virt-builder run, no guest, no system libvirtd.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

from pytest_devbox.config.profiles import BUILTIN_PROFILES
from pytest_devbox.guest.sweep import claim_run_dir
from pytest_devbox.host import owner
from pytest_devbox.host.layout import CacheLayout
from pytest_devbox.image.cache import ImageCache

TEST_URI = "test:///default"
INDEX = (
    "[debian-12]\nfile=debian-12.qcow2.xz\narch=x86_64\nrevision=3\nsize=4294967296\nformat=qcow2\n"
)


def seed_cache(root: Path) -> Path:
    """Fill ``root`` as above; returns the cached debian-12 image."""
    layout = CacheLayout(root)
    layout.templates.mkdir(parents=True, exist_ok=True)
    (layout.templates / "index").write_text(INDEX)
    # The guest user the Pool asks for: this host user's ids.
    cache = ImageCache(root, public_index=False, guest_user=("devbox", os.getuid(), os.getgid()))
    key = cache.key_for(BUILTIN_PROFILES["debian-12"])
    image = layout.image("debian-12", key)
    image.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    meta = {"key": key, "image_size": image.stat().st_size}
    image.with_suffix(".json").write_text(json.dumps(meta))
    return image


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def leftover_run_dir(root: Path, run_id: str, pid: int) -> Path:
    """A run dir as a session of ``pid`` on this host leaves it (an overlay inside)."""
    if pid == os.getpid():
        rdir = claim_run_dir(root, run_id)  # ours: claimed for real, its lock held
    else:
        rdir = CacheLayout(root).run(run_id)
        rdir.mkdir(parents=True)
        token = owner.Owner(owner.scope(), pid, owner.start_time(pid) or 0).token
        (rdir / "owner").write_text(f"{pid}\n{socket.gethostname()}\n{token}\n")
    (rdir / f"devbox-debian-12-{run_id}-0000.qcow2").write_bytes(b"overlay")
    return rdir

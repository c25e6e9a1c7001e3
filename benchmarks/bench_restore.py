"""Boot vs restore, to the first command, from one cached image in one run (printed,
never asserted).

For DISTRO (default debian-11) sharing /code over SHARE (default 9p; virtiofs where the
host stack can save it, host/stack.py, with guest ids passed through as the opt-in
--devbox-code-ids=passthrough gives them) on the same image, accel, memory and vCPUs:

- raw_boot_s: QEMU started directly on an overlay of the image (no libvirt, no share)
  until sshd's banner arrives: the floor of any boot;
- boot_start_s: `Machine.start` until a first `run("true")` returned (/code mounted);
- restore_start_s: `Machine.restore` to the same point (median of N; the restore slot
  is saved first if the cache has none, and that time is printed as save_s).

The table ends with the figures as one JSON line (what benchmarks/run.py collects);
`--json` prints that line alone.

    .venv/bin/python benchmarks/bench_restore.py [--distro D] [--share 9p|virtiofs] [-n N]
        [--guest-uid UID] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from pytest_devbox.config.profiles import BUILTIN_PROFILES, Profile
from pytest_devbox.config.settings import DEFAULT_URI
from pytest_devbox.guest.machine import Machine
from pytest_devbox.guest.restore import stack_at
from pytest_devbox.host.layout import default_cache_dir
from pytest_devbox.host.probes import resolve_accel
from pytest_devbox.image import qemu_img
from pytest_devbox.image.cache import ImageCache
from pytest_devbox.transport.ssh import probe_banner


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def raw_boot(image: Path, profile: Profile, accel: str, work: Path) -> float:
    """QEMU on an overlay of `image` until sshd greets on the forwarded port."""
    overlay = qemu_img.create_overlay(image, work / "raw.qcow2")
    port = free_port()
    argv = [
        "qemu-system-x86_64",
        "-machine",
        f"pc,accel={accel}",
        "-cpu",
        "host" if accel == "kvm" else "max",
        "-m",
        str(profile.memory_mib),
        "-smp",
        str(profile.vcpus),
        "-nodefaults",
        "-display",
        "none",
        "-serial",
        f"file:{work / 'raw.console.log'}",
        "-drive",
        f"file={overlay},if=virtio,format=qcow2,cache=unsafe",
        "-netdev",
        f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22",
        "-device",
        "virtio-net-pci,netdev=n0,romfile=",
        "-device",
        "virtio-rng-pci",
    ]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not probe_banner("127.0.0.1", port, timeout=2.0):
            if proc.poll() is not None or time.monotonic() - t0 > 600:
                raise SystemExit(f"raw QEMU boot failed (exit {proc.returncode})")
            time.sleep(0.25)
        return time.monotonic() - t0
    finally:
        proc.kill()
        proc.wait()
        overlay.unlink(missing_ok=True)


def to_first_command(start: Callable[[], Machine]) -> float:
    t0 = time.monotonic()
    with start() as m:
        m.run("true")
        return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--distro", default="debian-11")
    ap.add_argument("--share", choices=("9p", "virtiofs"), default="9p")
    ap.add_argument("-n", type=int, default=3, help="restores to take the median of")
    ap.add_argument("--guest-uid", type=int, default=os.getuid())
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.distro not in BUILTIN_PROFILES:
        raise SystemExit(
            f"unknown distro {args.distro!r}: use one of {', '.join(BUILTIN_PROFILES)}"
        )
    share = args.share
    if share == "virtiofs":
        stack = stack_at(DEFAULT_URI)
        if stack is None or not stack.virtiofs_restore:
            why = stack.restore_line() if stack else "libvirt cannot be reached"
            raise SystemExit(f"--share virtiofs cannot restore here: {why}; use --share 9p")
    base = BUILTIN_PROFILES[args.distro]
    # The built-in's own name (and so its image) when its share is the one asked for.
    name = args.distro if share == base.share else f"{args.distro}-{share}"
    profile = replace(base, name=name, share=share)
    ids = "passthrough" if share == "virtiofs" else "auto"
    accel = resolve_accel()
    uid = args.guest_uid
    cache = ImageCache(
        default_cache_dir(), public_index=False, tcg=accel == "tcg", guest_user=("devbox", uid, uid)
    )
    image = cache.image_for(profile)
    quiet: Callable[[str], None] = lambda _: None  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        code = work / "code"
        code.mkdir()

        def boot() -> Machine:
            return Machine.start(profile, cache=cache, code_dir=code, code_ids=ids, log=quiet)

        def restore() -> Machine:
            return Machine.restore(profile, cache=cache, code_dir=code, code_ids=ids, log=quiet)

        t0 = time.monotonic()
        restore().close()  # saves the slot when the cache has none
        warm_s = time.monotonic() - t0
        raw_s = raw_boot(image.path, profile, accel, work)
        boot_s = to_first_command(boot)
        restores = [to_first_command(restore) for _ in range(args.n)]
    restore_s = statistics.median(restores)
    figures = {
        "distro": profile.name,
        "share": share,
        "accel": accel,
        "memory_mib": profile.memory_mib,
        "vcpus": profile.vcpus,
        "first_restore_s": round(warm_s, 2),  # includes saving the slot on a cold cache
        "raw_boot_s": round(raw_s, 2),
        "boot_start_s": round(boot_s, 2),
        "restore_start_s": round(restore_s, 2),
        "restore_runs_s": [round(r, 2) for r in restores],
        "restore_over_raw_boot": round(restore_s / raw_s, 3),
        "restore_over_boot": round(restore_s / boot_s, 3),
    }
    if args.json:
        print(json.dumps(figures))
        return
    print(f"{profile.name} ({accel}, {profile.memory_mib} MiB, {profile.vcpus} vCPUs)")
    for label, key in (
        ("QEMU alone, to sshd's banner", "raw_boot_s"),
        ("boot, to a first command", "boot_start_s"),
        (f"restore, to a first command (median of {args.n})", "restore_start_s"),
        ("first restore of this run (saves a slot if none)", "first_restore_s"),
    ):
        print(f"{label:<52} {figures[key]:7.2f} s")
    print(
        f"restore / raw boot {figures['restore_over_raw_boot']:.2f}, "
        f"restore / boot {figures['restore_over_boot']:.2f}"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

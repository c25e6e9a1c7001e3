"""What this host can do: accelerator, virtiofsd, a kernel for libguestfs, the cache dir.

Probes only, each a plain answer; `devbox doctor` (cli/doctor.py) turns them into
advice, and the lower layers use them to fail early with the same words.
"""

from __future__ import annotations

import glob
import os
import platform
import shutil
import subprocess
from pathlib import Path

from ..errors import HostNotReady

VIRTIOFSD_PATHS = ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd", "/usr/lib/virtiofsd")


def kvm_problem() -> str | None:
    """Why KVM cannot run our guests here, or None when it really works."""
    if platform.machine() != "x86_64":
        return f"guests are x86_64 and this host is {platform.machine()}"
    if not os.path.exists("/dev/kvm"):
        return (
            "/dev/kvm does not exist (no hardware virtualisation or the kvm module is not loaded)"
        )
    if os.path.exists("/sys/module/kvm_pvm"):
        # PVM runs only guest kernels built for it: qemu aborts with -cpu host and
        # stock distro kernels hang early, so it is no use to us.
        return "/dev/kvm is PVM (kvm_pvm), which cannot boot stock distro kernels"
    if not any(os.path.exists(f"/sys/module/{m}") for m in ("kvm_intel", "kvm_amd")):
        return "neither kvm_intel nor kvm_amd is loaded"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user (join the kvm group)"
    return None


def resolve_accel(requested: str = "auto") -> str:
    """'kvm' or 'tcg'. 'auto' picks KVM only where it really works."""
    if requested == "tcg":
        return "tcg"
    problem = kvm_problem()
    if requested == "kvm":
        if problem:
            raise HostNotReady(f"--devbox-accel=kvm but {problem}; use --devbox-accel=auto or tcg")
        return "kvm"
    if requested != "auto":
        raise HostNotReady(f"unknown accel {requested!r}: use auto, kvm or tcg")
    return "tcg" if problem else "kvm"


def find_virtiofsd() -> str | None:
    for path in VIRTIOFSD_PATHS:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("virtiofsd")


def virtiofsd_ids(path: str | None = None) -> str:
    """What this host's virtiofsd can do with guest ids, for doctor's /code ids line.

    Only the Rust virtiofsd (1.13 and later) squashes guest ids (--translate-uid/gid);
    libvirt never passes those, and its <idmap> is a user namespace (1:1) for an
    unprivileged virtiofsd, so virtiofs ids pass through whichever daemon is here."""
    path = path or find_virtiofsd()
    if path is None:
        return "no virtiofsd"
    try:
        out = subprocess.run(
            [path, "--help"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return f"{path} does not run"
    if "--translate-uid" in out.stdout + out.stderr:
        return f"{path} can translate ids, but libvirt does not ask it to"
    return f"{path} cannot translate ids"


def host_kernel() -> str | None:
    """A kernel libguestfs (supermin) can boot its appliance with, or None."""
    for vmlinuz in sorted(glob.glob("/boot/vmlinuz-*"), reverse=True):
        version = vmlinuz.split("vmlinuz-", 1)[1]
        if os.access(vmlinuz, os.R_OK) and os.path.isdir(f"/lib/modules/{version}"):
            return vmlinuz
    return None


def cache_problem(cache_dir: Path) -> str | None:
    """Why `cache_dir` cannot be this user's cache (one line, with what to do), or None.
    Made 0700 if missing. What it holds is trusted (kept records, the SSH key, images),
    so it must be ours and writable by nobody else."""
    try:
        cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = cache_dir.stat()
    except OSError as e:
        return f"cannot create {cache_dir}: {e.strerror}"
    elsewhere = "use a cache of your own (--devbox-cache DIR or $PYTEST_DEVBOX_CACHE)"
    if st.st_uid != os.geteuid():
        return f"{cache_dir} belongs to uid {st.st_uid}, not to you: {elsewhere}"
    if st.st_mode & 0o022:
        return f"{cache_dir} is writable by others: `chmod go-w {cache_dir}`, or {elsewhere}"
    if not os.access(cache_dir, os.W_OK | os.X_OK):
        return f"{cache_dir} is not writable by this user: {elsewhere}"
    return None

"""What this host can do: accelerator, libvirt, tools, kernel for libguestfs, cache dir.

Every check returns a `Check` with a fix a person can act on; `devbox doctor` prints them
and the machine layer uses the same functions to fail early with the same advice.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

VIRTIOFSD_PATHS = ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd", "/usr/lib/virtiofsd")
TOOLS = {
    "virt-builder": "guestfs-tools",
    "qemu-img": "qemu-utils",
    "guestfish": "libguestfs-tools",
    "mmdebstrap": "mmdebstrap",
}


# An uploaded image and a few overlays: what a remote pool needs at the least.
MIN_POOL_FREE = 4 << 30


@dataclass(frozen=True)
class Check:
    """One line of `devbox doctor`."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def default_cache_dir() -> Path:
    """Where images, keys and templates live: shared by every project of this user."""
    override = os.environ.get("PYTEST_DEVBOX_CACHE")
    if override:
        return Path(override)
    if os.geteuid() == 0:
        return Path("/var/cache/pytest-devbox")
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "pytest-devbox"


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
            from ..errors import HostNotReady

            raise HostNotReady(f"--devbox-accel=kvm but {problem}; use --devbox-accel=auto or tcg")
        return "kvm"
    if requested != "auto":
        from ..errors import HostNotReady

        raise HostNotReady(f"unknown accel {requested!r}: use auto, kvm or tcg")
    return "tcg" if problem else "kvm"


def libvirt_problem(uri: str) -> tuple[str, str] | None:
    """(what is wrong, how to fix it) when libvirt at `uri` cannot be reached, else None."""
    from ..errors import HostNotReady
    from ..virt.domain import connect  # the one place that turns libvirt errors into advice

    try:
        connect(uri).close()
    except HostNotReady as e:
        problem, _, fix = str(e).partition("\n")
        return problem, fix
    return None


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
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot create {cache_dir}: {e.strerror}"
    if not os.access(cache_dir, os.W_OK | os.X_OK):
        return f"{cache_dir} is not writable by this user"
    return None


def qemu_user_check(uri: str, paths: Sequence[Path], policy: str) -> Check:
    """Whether the user QEMU runs as for our guests reaches the cache and the code dir
    (a private home stops libvirt's own user): found before any boot, with the fix."""
    from ..virt import qemu_user
    from ..virt.domain import connect

    conn = connect(uri)
    try:
        who = qemu_user.identity(conn, uri, policy)
    finally:
        conn.close()
    if not qemu_user.is_local(uri):
        return Check("qemu user", True, f"{who.describe()} on the remote host", required=False)
    problem = who.reach_problem(paths)
    if problem is not None:
        return Check("qemu user", False, *problem)
    return Check("qemu user", True, f"{who.describe()}; reaches the cache and code dir")


def run_checks(
    uri: str,
    cache_dir: Path,
    accel: str = "auto",
    *,
    code_dir: Path | None = None,
    qemu_user: str = "caller",
    remote_pool: str | None = None,
) -> list[Check]:
    """Every doctor check, in the order a person would fix them; with `remote_pool`, a
    remote `uri`'s too (its SSH tunnel, accel, our pool and its free disk)."""
    problem = libvirt_problem(uri)
    checks = [
        Check(
            "libvirt",
            problem is None,
            problem[0] if problem else f"reachable at {uri}",
            problem[1] if problem else "",
        )
    ]
    if problem is None:
        paths = [cache_dir] if code_dir is None else [cache_dir, code_dir]
        checks.append(qemu_user_check(uri, paths, qemu_user))
        if remote_pool is not None:
            checks += remote_checks(uri, remote_pool)
    checks += [_accel_check(accel), _virtiofsd_check(), *_tool_checks(), _kernel_check()]
    cproblem = cache_problem(cache_dir)
    checks.append(
        Check(
            "cache",
            cproblem is None,
            cproblem or f"{cache_dir} writable",
            f"use --devbox-cache DIR or fix the permissions of {cache_dir}" if cproblem else "",
        )
    )
    return checks


def remote_checks(uri: str, pool_dir: str) -> list[Check]:
    """What a remote libvirt host needs beyond libvirt: [] for a local `uri`."""
    from ..errors import DevboxError
    from ..transport.tunnel import Tunnel, parse_uri
    from ..virt import domain, volumes

    remote = parse_uri(uri)
    if remote is None:
        return []
    checks = []
    tunnel = Tunnel(remote, timeout=15.0)
    try:
        tunnel.connect()
        checks.append(Check("ssh tunnel", True, f"{remote.describe()} (guests' SSH goes here)"))
    except DevboxError as e:
        checks.append(Check("ssh tunnel", False, str(e), "fix the login libvirt uses"))
    finally:
        tunnel.close()
    conn = domain.connect(uri)
    try:
        kvm = domain.kvm_problem_of(conn)
        detail = "libvirt offers kvm" if kvm is None else f"tcg only ({kvm})"
        checks.append(
            Check(
                "remote accel",
                True,
                detail + "; --devbox-accel decides (auto looks at this host)",
                required=False,
            )
        )
        try:
            pool = volumes.ensure_pool(conn, pool_dir)
            pool.refresh(0)
            free = pool.info()[3]
            ok = free >= MIN_POOL_FREE
            fix = "" if ok else "free disk there, or use --devbox-remote-pool on a larger disk"
            checks.append(Check("remote pool", ok, f"{pool_dir}: {free / 2**30:.1f} GiB free", fix))
        except DevboxError as e:
            checks.append(Check("remote pool", False, str(e), "use --devbox-remote-pool"))
    finally:
        conn.close()
    return checks


def _accel_check(accel: str) -> Check:
    kvm = kvm_problem()
    if accel == "kvm" and kvm:
        return Check("accel", False, f"kvm requested but {kvm}", "use --devbox-accel=auto")
    chosen = "tcg" if accel == "tcg" or kvm else "kvm"
    why = f" ({kvm})" if kvm and accel != "tcg" else ""
    slow = "; guests run under software emulation, boots take about 30 s" if chosen == "tcg" else ""
    return Check("accel", True, f"{chosen}{why}{slow}")


def _virtiofsd_check() -> Check:
    vfsd = find_virtiofsd()
    return Check(
        "virtiofsd",
        vfsd is not None,
        vfsd or "not found (needed for virtiofs shares)",
        "" if vfsd else "install qemu-system-common (Debian 12) or virtiofsd",
        required=False,
    )


def _tool_checks() -> list[Check]:
    checks = []
    for tool, package in TOOLS.items():
        path = shutil.which(tool)
        fix = "" if path else f"install the {package} package (`sudo apt-get install {package}`)"
        checks.append(
            Check(tool, path is not None, path or "not found", fix, required=tool != "mmdebstrap")
        )
    return checks


def _kernel_check() -> Check:
    kernel = host_kernel()
    return Check(
        "libguestfs kernel",
        kernel is not None,
        kernel or "no readable /boot/vmlinuz-* with matching /lib/modules",
        ""
        if kernel
        else "install a kernel package (`sudo apt-get install linux-image-amd64`) "
        "and make it readable (`sudo chmod 0644 /boot/vmlinuz-*`)",
    )


def format_checks(checks: Sequence[Check]) -> str:
    lines = []
    for c in checks:
        mark = "ok  " if c.ok else ("FAIL" if c.required else "warn")
        line = f"[{mark}] {c.name:<18} {c.detail}"
        if c.fix and not c.ok:
            line += f"\n       fix: {c.fix}"
        lines.append(line)
    return "\n".join(lines)


def checks_json(checks: Sequence[Check]) -> str:
    return json.dumps([asdict(c) for c in checks], indent=2)

"""`devbox doctor`: every check of this host (and a remote libvirt host), in the order a
person would fix them, each with a fix a person can act on."""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import code_ids
from ..config.option_table import spell_for_command
from ..errors import DevboxError, HostNotReady
from ..host.probes import cache_problem, find_virtiofsd, host_kernel, kvm_problem, virtiofsd_ids
from ..host.stack import probe as probe_stack
from ..transport.tunnel import Tunnel, parse_uri
from ..virt import domain, qemu_user, volumes
from .context import Context

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


def cmd_doctor(args: argparse.Namespace, ctx: Context) -> int:
    s = ctx.settings
    checks = run_checks(
        s.uri,
        s.cache_dir,
        s.accel,
        code_dir=s.code_dir,
        qemu_user_policy=s.qemu_user,
        remote_pool=s.remote_pool,
    )
    ids = f"{code_ids.header_line(s.code_ids)} ({virtiofsd_ids()})"
    checks.append(Check("code ids", True, ids, required=False))
    text = checks_json(checks) if args.json else format_checks(checks)
    print(spell_for_command(text))
    return 0 if all(c.ok or not c.required for c in checks) else 1


def libvirt_problem(uri: str) -> tuple[str, str] | None:
    """(what is wrong, how to fix it) when libvirt at `uri` cannot be reached, else None."""
    from ..virt.domain import connect  # the one place that turns libvirt errors into advice

    try:
        connect(uri).close()
    except HostNotReady as e:
        problem, _, fix = str(e).partition("\n")
        return problem, fix
    return None


def qemu_user_check(uri: str, paths: Sequence[Path], policy: str) -> Check:
    """Whether the user QEMU runs as for our guests reaches the cache and the code dir
    (a private home stops libvirt's own user): found before any boot, with the fix."""
    conn = domain.connect(uri)
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


def stack_checks(uri: str) -> list[Check]:
    """The host stack's versions and what they allow (host/stack.py): informational,
    never a failure (without them virtiofs guests boot, and ids stay safe over 9p)."""
    conn = domain.connect(uri)
    try:
        stack = probe_stack(conn.getLibVersion(), conn.getVersion(), uri)
    finally:
        conn.close()
    where = "" if qemu_user.is_local(uri) else " (virtiofsd: this host's, not the remote's)"
    return [
        Check("stack", True, stack.describe() + where, required=False),
        Check("virtiofs restore", stack.virtiofs_restore, stack.restore_line(), required=False),
        Check("virtiofs id map", stack.id_mapping, stack.idmap_line(), required=False),
    ]


def run_checks(
    uri: str,
    cache_dir: Path,
    accel: str = "auto",
    *,
    code_dir: Path | None = None,
    qemu_user_policy: str = "caller",
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
        checks.append(qemu_user_check(uri, paths, qemu_user_policy))
        checks += stack_checks(uri)
        checks.append(uefi_check(uri, accel))
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
    from ..virt import domain

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


def uefi_check(uri: str, accel: str) -> Check:
    """Whether profiles with firmware = "uefi" can boot: only they need OVMF."""
    conn = domain.connect(uri)
    try:
        problem = domain.uefi_problem(conn, "tcg" if kvm_problem() or accel == "tcg" else "kvm")
    finally:
        conn.close()
    return Check(
        "uefi firmware",
        problem is None,
        "OVMF found" if problem is None else problem.split(": install")[0],
        "install the ovmf package (`sudo apt-get install ovmf`): profiles with "
        'firmware = "uefi" need it',
        required=False,
    )


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

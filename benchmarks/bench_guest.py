"""Boot and per-command cost on a real guest, printed (never asserted).

Boots DISTRO (default debian-12) from the cached image, then runs `true` N times each
way, in one run so the ratios hold however noisy the host is:

- exec_ms: through the login's resident executor (what `Machine.run` does by default);
- ssh_reused_ms: an SSH exec channel per command on the reused paramiko transport
  (`--devbox-exec=ssh`);
- ssh_process_ms: an OpenSSH client process per command (the line `ssh_command()` gives);

plus the same for `user="root"` and for another user (`nobody`: sudo over SSH, the
root executor's own switch otherwise), and executor commands back to back. Prints
medians, and the three headline figures as one JSON line.

    .venv/bin/python benchmarks/bench_guest.py [DISTRO] [N]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pytest_devbox.config.profiles import BUILTIN_PROFILES
from pytest_devbox.guest.machine import Machine
from pytest_devbox.host.layout import default_cache_dir
from pytest_devbox.host.probes import resolve_accel
from pytest_devbox.image.cache import ImageCache


def measure(m: Machine, n: int) -> dict[str, float]:
    """Median milliseconds of `true` each way; rounds interleave the ways, so a guest
    still settling after its boot (or a busy host) weighs on each way alike."""
    logins = m._logins
    user, root = logins.login_for(None)[0], logins.root
    for login in (user, root):  # start both executors outside the timings
        login.run("true", cwd=None)
    argv = [*m.ssh_argv(), "-o", "BatchMode=yes", "true"]
    ways: dict[str, Callable[[], object]] = {
        "exec_ms": lambda: m.run("true", cwd=None),
        "ssh_reused_ms": lambda: user.conn.run("true", cwd=None),
        "ssh_process_ms": lambda: subprocess.run(argv, check=True),
        "exec_root_ms": lambda: m.run("true", user="root", cwd=None),
        "ssh_reused_root_ms": lambda: root.conn.run("true", cwd=None),
        "exec_other_user_ms": lambda: m.run("true", user="nobody", cwd=None),
        "ssh_reused_sudo_ms": lambda: root.conn.run("true", user="nobody", cwd=None),
    }
    times: dict[str, list[float]] = {key: [] for key in ways}
    for _ in range(n):
        for key, way in ways.items():
            t = time.perf_counter()
            way()
            times[key].append(time.perf_counter() - t)
    figures = {key: statistics.median(xs) * 1000 for key, xs in times.items()}
    # And commands back to back, as a test that only runs commands would: the warm
    # shell started after one command may not be ready for the next.
    back_to_back = []
    for _ in range(n):
        t = time.perf_counter()
        m.run("true", cwd=None)
        back_to_back.append(time.perf_counter() - t)
    figures["exec_back_to_back_ms"] = statistics.median(back_to_back) * 1000
    return figures


def main() -> None:
    distro = sys.argv[1] if len(sys.argv) > 1 else "debian-12"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    # As root the guest user gets uid 4242, like the test suite's: its cached image serves.
    uid = 4242 if os.geteuid() == 0 else os.getuid()
    cache = ImageCache(
        default_cache_dir(),
        public_index=False,
        tcg=resolve_accel() == "tcg",
        guest_user=("devbox", uid, uid),
    )
    t0 = time.perf_counter()
    image = cache.image_for(BUILTIN_PROFILES[distro])
    image_s = time.perf_counter() - t0
    with (
        tempfile.TemporaryDirectory() as code,
        Machine.start(
            BUILTIN_PROFILES[distro], cache=cache, code_dir=Path(code), log=lambda _: None
        ) as m,
    ):
        figures = measure(m, n)
        python = m._logins.root.executor()
    print(
        f"{distro} ({resolve_accel()}): image {'built' if image.built else 'cached'} "
        f"{image_s:.1f} s, boot to usable {m.boot_seconds:.1f} s, executor on "
        f"{'python ' + python.python if python else 'none (plain SSH)'}"
    )
    for key, ms in figures.items():
        print(f"{key:<20} median {ms:8.1f} ms  (n={n})")
    exec_ms = figures["exec_ms"]
    print(
        f"ssh_process / exec: {figures['ssh_process_ms'] / exec_ms:.1f}x, "
        f"ssh_reused / exec: {figures['ssh_reused_ms'] / exec_ms:.1f}x"
    )
    headline = ("exec_ms", "ssh_reused_ms", "ssh_process_ms")
    print(json.dumps({k: round(figures[k], 1) for k in headline}))


if __name__ == "__main__":
    main()

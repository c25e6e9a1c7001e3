"""Boot and per-command cost on a real guest, printed (never asserted).

Boots DISTRO (default debian-12) from the cached image, then runs `true` N times over
the machine's reused paramiko connection and N times through an OpenSSH client process
(the line `ssh_command()` gives), and prints boot time and both means in one run, so
the ratio holds however noisy the host is.

    .venv/bin/python benchmarks/bench_guest.py [DISTRO] [N]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pytest_devbox.distros import BUILTIN_PROFILES
from pytest_devbox.host import default_cache_dir, resolve_accel
from pytest_devbox.images import ImageCache
from pytest_devbox.machine import Machine


def main() -> None:
    distro = sys.argv[1] if len(sys.argv) > 1 else "debian-12"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    cache = ImageCache(default_cache_dir(), public_index=False, tcg=resolve_accel() == "tcg")
    t0 = time.perf_counter()
    image = cache.image_for(BUILTIN_PROFILES[distro])
    image_s = time.perf_counter() - t0
    with (
        tempfile.TemporaryDirectory() as code,
        Machine.start(
            BUILTIN_PROFILES[distro], cache=cache, code_dir=Path(code), log=lambda _: None
        ) as m,
    ):
        reused = []
        for _ in range(n):
            t = time.perf_counter()
            m.run("true")
            reused.append(time.perf_counter() - t)
        argv = [*m.ssh_argv(), "-o", "BatchMode=yes", "true"]
        spawned = []
        for _ in range(n):
            t = time.perf_counter()
            subprocess.run(argv, check=True, capture_output=True)
            spawned.append(time.perf_counter() - t)
    print(
        f"{distro} ({resolve_accel()}): image {'built' if image.built else 'cached'} "
        f"{image_s:.1f} s, boot to usable {m.boot_seconds:.1f} s"
    )
    for label, xs in (("reused paramiko transport", reused), ("ssh process per command", spawned)):
        print(
            f"{label:<28} mean {statistics.mean(xs) * 1000:7.1f} ms  "
            f"median {statistics.median(xs) * 1000:7.1f} ms  (n={n})"
        )
    print(f"ratio: {statistics.mean(spawned) / statistics.mean(reused):.1f}x")


if __name__ == "__main__":
    main()

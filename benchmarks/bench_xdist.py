"""`pytest -n N examples` on several distros, watched from libvirt: printed, not asserted.

Runs pytest-xdist's controller on the examples project and, every second meanwhile,
lists libvirt's devbox domains: the controller's (the shared guests) per distro, and
the workers' (fresh guests). Prints the most of each seen at once, what is left after
the run, the wall-clock time and the devbox summary of the controller, then those
figures as one JSON line (what benchmarks/run.py collects).

    .venv/bin/python benchmarks/bench_xdist.py [N] [DISTROS]
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pytest_devbox.virt import domain as dom

URI = "qemu:///system"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def domains() -> list[tuple[str, dict[str, str]]]:
    conn = dom.connect(URI)
    try:
        return dom.list_devbox_domains(conn)
    finally:
        conn.close()


def parent(pid: str) -> str:
    try:
        # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces, not ")".
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
    except (OSError, IndexError):
        return ""


def watch(proc: subprocess.Popen[str]) -> tuple[dict[str, int], int, set[str]]:
    """Until `proc` ends: the most shared guests per distro and fresh guests at once,
    and the pids that owned them (the controller and its workers)."""
    controller = str(proc.pid)
    before = {name for name, _ in domains()}
    shared_most: collections.Counter[str] = collections.Counter()
    fresh_most = 0
    owners = {controller}
    while proc.poll() is None:
        found = [m for name, m in domains() if name not in before]
        shared = collections.Counter(m["distro"] for m in found if m.get("owner_pid") == controller)
        for distro, count in shared.items():
            shared_most[distro] = max(shared_most[distro], count)
        fresh = [m for m in found if parent(m.get("owner_pid", "")) == controller]
        fresh_most = max(fresh_most, len(fresh))
        owners.update(m["owner_pid"] for m in fresh)
        time.sleep(1.0)
    return dict(shared_most), fresh_most, owners


def main() -> None:
    n = sys.argv[1] if len(sys.argv) > 1 else "4"
    distros = sys.argv[2] if len(sys.argv) > 2 else "debian-11,debian-12"
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", n,
            f"--devbox={distros}", "-q"]  # fmt: skip
    t0 = time.perf_counter()
    # A file, not a pipe: an unread pipe could fill while we poll and block pytest.
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(argv, cwd=EXAMPLES, stdout=log, stderr=subprocess.STDOUT, text=True)
        shared_most, fresh_most, owners = watch(proc)
        seconds = time.perf_counter() - t0
        log.seek(0)
        out = log.read()
    left = [name for name, m in domains() if m.get("owner_pid") in owners]
    print(f"pytest -n {n} examples --devbox={distros}: exit {proc.returncode} in {seconds:.0f} s")
    print(f"most shared guests at once (the controller's), per distro: {shared_most}")
    print(f"most fresh guests at once (the workers'): {fresh_most}")
    print(f"devbox domains of the run left after it: {left or 'none'}")
    summary = out[out.find("= devbox =") :] if "= devbox =" in out else out[-2000:]
    print(summary.rstrip())
    figures = {
        "xdist_exit": proc.returncode,
        "xdist_s": round(seconds, 1),
        "xdist_shared_most": shared_most,
        "xdist_fresh_most": fresh_most,
        "xdist_left": left,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

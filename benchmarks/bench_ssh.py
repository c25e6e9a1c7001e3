"""SSH costs, printed (never asserted).

``latency``: per-command cost of one reused paramiko transport vs one OpenSSH client
process each, against a throwaway sshd on 127.0.0.1 (DESIGN.md measured ~120 ms vs
~900 ms on a TCG guest).

``load``: commands per second on ONE connection from 1, 4 and 16 threads, errors
counted (issue 16). Against a local sshd left at OpenSSH's default MaxSessions 10, or
with ``--guest DISTRO`` against a real guest booted from the cache.

Either ends with its figures as one JSON line (what benchmarks/run.py collects).

    .venv/bin/python benchmarks/bench_ssh.py latency [-n 20]
    .venv/bin/python benchmarks/bench_ssh.py load [-n 10] [--guest debian-12]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from local_sshd import client_files, host_key, run_sshd  # type: ignore[import-not-found]

from pytest_devbox.result import Result
from pytest_devbox.transport.ssh import Connection

Run = Callable[[str], Result]


def _measure(n: int, once: Callable[[], object]) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return times


def _report(label: str, times: list[float]) -> float:
    """Print mean and median; return the median in milliseconds."""
    print(
        f"{label:<34} mean {statistics.mean(times) * 1000:7.1f} ms   "
        f"median {statistics.median(times) * 1000:7.1f} ms   (n={len(times)})"
    )
    return round(statistics.median(times) * 1000, 1)


@contextlib.contextmanager
def _local_connection(max_sessions: int) -> Iterator[Connection]:
    with tempfile.TemporaryDirectory(prefix="bench-ssh-") as tmp:
        work = Path(tmp)
        key, authorized = client_files(work)
        hk = host_key(work / "host_key")
        with run_sshd(work / "sshd", authorized, hk, max_sessions=max_sessions) as sshd:
            conn = Connection(
                "127.0.0.1",
                sshd.port,
                key_path=key,
                known_hosts=work / "known_hosts",
                host_key_alias="bench",
            )
            start = time.perf_counter()
            conn.connect(timeout=10)
            print(f"paramiko connect + auth: {(time.perf_counter() - start) * 1000:.1f} ms")
            try:
                yield conn
            finally:
                conn.close()


def latency(n: int) -> dict[str, float]:
    with _local_connection(max_sessions=50) as conn:
        argv = [*conn.ssh_command(), "-o", "BatchMode=yes", "true"]
        conn.run("true", cwd=None)  # warm up both paths once
        subprocess.run(argv, check=True)
        reused = _report(
            "paramiko, reused transport", _measure(n, lambda: conn.run("true", cwd=None))
        )
        process = _report(
            "ssh client process per command",
            _measure(n, lambda: subprocess.run(argv, check=True)),
        )
    # "local_": a local sshd, not a guest (bench_guest.py's ssh_*_ms are a guest's).
    return {"local_ssh_reused_ms": reused, "local_ssh_process_ms": process}


def _hammer(run: Run, threads: int, commands: int) -> tuple[float, int, int]:
    """(seconds, correct results, errors) for ``commands`` echoes from each thread."""
    counts = {"ok": 0, "errors": 0}
    lock = threading.Lock()
    barrier = threading.Barrier(threads + 1)

    def worker(t: int) -> None:
        barrier.wait()
        for i in range(commands):
            token = f"t{t}-c{i}"
            try:
                good = run(f"echo {token}").stdout == token + "\n"
            except Exception:
                good = False
            with lock:
                counts["ok" if good else "errors"] += 1

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    barrier.wait()
    start = time.perf_counter()
    for th in pool:
        th.join()
    return time.perf_counter() - start, counts["ok"], counts["errors"]


def _load_rounds(
    label: str, run: Run, commands: int, refused: Callable[[], int]
) -> dict[str, float]:
    figures: dict[str, float] = {}
    for threads in (1, 4, 16):
        before = refused()
        seconds, ok, errors = _hammer(run, threads, commands)
        print(
            f"{label}: {threads:>2} threads x {commands}: {ok / seconds:6.1f} commands/s, "
            f"{ok} ok, {errors} errors, {refused() - before} refused opens retried"
        )
        figures[f"load_{threads}_threads_per_s"] = round(ok / seconds, 1)
        figures["load_errors"] = figures.get("load_errors", 0) + errors
    return figures


def load(commands: int, guest: str | None) -> dict[str, float]:
    if guest is None:
        with _local_connection(max_sessions=10) as conn:
            run: Run = lambda c: conn.run(c, cwd=None)  # noqa: E731
            return _load_rounds("local sshd", run, commands, lambda: conn.refused_opens)
    from pytest_devbox.config.profiles import BUILTIN_PROFILES
    from pytest_devbox.guest.machine import Machine
    from pytest_devbox.host.layout import default_cache_dir
    from pytest_devbox.host.probes import resolve_accel
    from pytest_devbox.image.cache import ImageCache

    cache = ImageCache(default_cache_dir(), public_index=False, tcg=resolve_accel() == "tcg")
    with (
        tempfile.TemporaryDirectory() as code,
        Machine.start(BUILTIN_PROFILES[guest], cache=cache, code_dir=Path(code)) as m,
    ):
        label = f"{guest} ({resolve_accel()})"
        conn = m._logins.login_for(None)[0].conn  # the login m.run uses by default
        return _load_rounds(label, m.run, commands, lambda: conn.refused_opens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["latency", "load"], nargs="?", default="latency")
    parser.add_argument("-n", type=int, default=None, help="commands (per thread for load)")
    parser.add_argument("--guest", metavar="DISTRO", help="load: a real guest, not local sshd")
    args = parser.parse_args()
    what = args.what
    figures = latency(args.n or 20) if what == "latency" else load(args.n or 10, args.guest)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

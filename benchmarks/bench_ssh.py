"""Per-command cost: one reused paramiko transport vs one OpenSSH client process each.

Starts a throwaway sshd on 127.0.0.1 (as the SSH tests do), runs ``true`` N times both
ways and prints the mean and median. Figures are printed, not asserted: on a booted
guest the gap is what matters (DESIGN.md measured ~120 ms vs ~900 ms under TCG).

    .venv/bin/python benchmarks/bench_ssh.py [N]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_ssh import _host_key, run_sshd  # type: ignore[import-not-found]

from pytest_devbox.ssh import Connection, ensure_keypair, public_key_line


def _measure(n: int, once: Callable[[], object]) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return times


def _report(label: str, times: list[float]) -> None:
    print(
        f"{label:<34} mean {statistics.mean(times) * 1000:7.1f} ms   "
        f"median {statistics.median(times) * 1000:7.1f} ms   (n={len(times)})"
    )


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    with tempfile.TemporaryDirectory(prefix="bench-ssh-") as tmp:
        work = Path(tmp)
        key = ensure_keypair(work / "keys")
        authorized = work / "authorized_keys"
        authorized.write_text(public_key_line(key) + "\n")
        with run_sshd(work / "sshd", authorized, _host_key(work / "host_key")) as sshd:
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
            argv = [*conn.ssh_command(), "-o", "BatchMode=yes", "true"]
            conn.run("true", cwd=None)  # warm up both paths once
            subprocess.run(argv, check=True)
            _report("paramiko, reused transport", _measure(n, lambda: conn.run("true", cwd=None)))
            _report(
                "ssh client process per command",
                _measure(n, lambda: subprocess.run(argv, check=True)),
            )
            conn.close()


if __name__ == "__main__":
    main()

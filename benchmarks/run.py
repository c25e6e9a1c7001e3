"""One front for the benchmarks: runs the chosen ones, shows their output, and with
--json prints their headline figures merged into one JSON object.

Each benchmark runs as its own process (`python benchmarks/bench_NAME.py`) and ends with
its figures as one JSON line; that line is what this collects. Names (default: guest and
restore):

    guest     boot and per-command cost on a debian-12 guest (exec_ms, ssh_reused_ms,
              ssh_process_ms, ...)
    restore   boot vs restore to a first command, debian-11 over 9p
    parallel  two distros from a cold image cache at once vs each alone (minutes)
    xdist     `pytest -n 4 examples` on debian-11 and debian-12, watched from libvirt
    ssh       SSH latency against a throwaway local sshd (no guest)
    cloud     the vendor-like cloud image booted with cloud-init enabled vs imported
              (neutralised): boot_to_command_raw_s, boot_to_command_imported_s

With --json the benchmarks' own output goes to stderr and stdout holds only the merged
object: each figure under its own name, or `NAME.figure` when an earlier benchmark of
the run already gave that name; `runs` has each one's exit status and seconds. The exit
status is 1 when any benchmark failed (the others still run). Arguments after `--` go
to each chosen benchmark instead of its defaults (`run.py guest -- debian-11 50`).

    .venv/bin/python benchmarks/run.py [--json] [NAMES...] [-- ARGS...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

HERE = Path(__file__).resolve().parent
# Name -> the script and its arguments.
BENCHMARKS: dict[str, list[str]] = {
    "guest": ["bench_guest.py"],
    "restore": ["bench_restore.py"],
    "parallel": ["bench_parallel.py"],
    "xdist": ["bench_xdist.py"],
    "ssh": ["bench_ssh.py", "latency"],
    "cloud": ["bench_cloud.py"],
}
DEFAULT = ("guest", "restore")


def last_json_object(lines: list[str]) -> dict[str, Any]:
    """The last line that is a JSON object: a benchmark's figures ({} if none)."""
    for line in reversed(lines):
        line = line.strip()
        if line.startswith("{"):
            try:
                found = json.loads(line)
            except ValueError:
                continue
            if isinstance(found, dict):
                return found
    return {}


def run_one(name: str, show: TextIO, extra: list[str]) -> tuple[int, float, dict[str, Any]]:
    """Run benchmark `name` (with `extra` for its default arguments, if any), copying
    its stdout to `show` as it comes (stderr is inherited): its exit status, seconds,
    and figures."""
    script, *args = BENCHMARKS[name]
    args = extra or args
    argv = [sys.executable, str(HERE / script), *args]
    print(f"=== {name}: {' '.join(argv[1:])}", file=show, flush=True)
    t0 = time.perf_counter()
    lines: list[str] = []
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            show.write(line)
            show.flush()
            lines.append(line)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        print(f"=== {name}: exit {proc.returncode}", file=show, flush=True)
    return proc.returncode, seconds, last_json_object(lines)


def merge(figures: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One object of every benchmark's figures, in run order; a name an earlier
    benchmark already gave becomes `NAME.figure`, so nothing is overwritten."""
    merged: dict[str, Any] = {}
    for name, theirs in figures.items():
        for key, value in theirs.items():
            merged[key if key not in merged else f"{name}.{key}"] = value
    return merged


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--json", action="store_true", help="print the merged figures as JSON")
    ap.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"benchmarks to run: {', '.join(BENCHMARKS)} (default: {' '.join(DEFAULT)})",
    )
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = ap.parse_args(argv[: len(argv) - len(extra)])
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    names = list(dict.fromkeys(args.names)) or list(DEFAULT)
    # With --json, stdout is the merged object alone: the benchmarks talk on stderr.
    show = sys.stderr if args.json else sys.stdout
    runs: dict[str, dict[str, Any]] = {}
    figures: dict[str, dict[str, Any]] = {}
    for name in names:
        code, seconds, figures[name] = run_one(name, show, extra)
        runs[name] = {"exit": code, "seconds": round(seconds, 1)}
    if args.json:
        print(json.dumps({**merge(figures), "runs": runs}))
    return 1 if any(r["exit"] for r in runs.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

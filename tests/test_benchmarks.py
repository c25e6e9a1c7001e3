"""benchmarks/run.py, the one front for the benchmarks: run for real on the one that
needs no guest (bench_ssh against a throwaway local sshd)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from local_sshd import HAVE_SSHD

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
RUN = BENCHMARKS / "run.py"


def run_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_run", RUN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not HAVE_SSHD, reason="needs /usr/sbin/sshd and ssh-keygen")
def test_json_is_the_merged_figures_alone_on_stdout() -> None:
    argv = [sys.executable, str(RUN), "--json", "ssh", "--", "latency", "-n", "3"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=True)
    merged = json.loads(proc.stdout)  # nothing but the object on stdout
    assert set(merged) == {"local_ssh_reused_ms", "local_ssh_process_ms", "runs"}
    assert merged["local_ssh_reused_ms"] > 0 and merged["local_ssh_process_ms"] > 0
    assert merged["runs"]["ssh"]["exit"] == 0 and merged["runs"]["ssh"]["seconds"] > 0
    # The benchmark's own output is shown, on stderr, with the arguments after `--`.
    assert "=== ssh: " in proc.stderr and "latency -n 3" in proc.stderr
    assert "ssh client process per command" in proc.stderr and "(n=3)" in proc.stderr


def test_every_benchmark_script_exists_and_is_documented() -> None:
    run = run_module()
    assert set(run.DEFAULT) <= set(run.BENCHMARKS)
    doc = run.__doc__
    for name, (script, *_) in run.BENCHMARKS.items():
        assert (BENCHMARKS / script).is_file()
        assert f"\n    {name} " in doc
        # Each one ends with its figures as a JSON line: it says so, and prints one.
        assert "json.dumps(" in (BENCHMARKS / script).read_text()


def test_an_unknown_name_is_a_usage_error() -> None:
    proc = subprocess.run(
        [sys.executable, str(RUN), "guest", "nope"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert "unknown benchmark nope; choose from guest, restore, parallel, xdist, ssh" in (
        proc.stderr
    )


def test_merge_keeps_every_figure_and_the_last_json_line_wins() -> None:
    run = run_module()
    assert run.merge(
        {
            "guest": {"exec_ms": 40.0, "accel": "kvm"},
            "restore": {"restore_start_s": 3.8, "accel": "tcg"},
        }
    ) == {"exec_ms": 40.0, "accel": "kvm", "restore_start_s": 3.8, "restore.accel": "tcg"}
    lines = ['{"early": 1}\n', "median 3 ms\n", '{"exec_ms": 40.0}\n', "{not json\n", "[1]\n"]
    assert run.last_json_object(lines) == {"exec_ms": 40.0}
    assert run.last_json_object(["no figures\n"]) == {}

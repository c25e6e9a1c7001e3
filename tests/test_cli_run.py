"""`devbox run` without guests: the shell line it sends, output of several guests at once
(real processes standing in for ssh), the result lines and the exit status."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from pytest_devbox.cli.run import Outcome, Prefixed, _report, remote_line
from pytest_devbox.errors import DevboxError, HostNotReady
from pytest_devbox.host.parallel import run_bounded


def test_words_are_joined_as_ssh_joins_them_and_run_in_code() -> None:
    line = remote_line(["ls /code | head -3;", "pwd"])
    assert line == "cd /code || exit; ls /code | head -3; pwd"
    assert remote_line(["ls", "-l", "/code"]) == "cd /code || exit; ls -l /code"
    # A shell runs it as shell code, and stops at once where /code is missing.
    r = subprocess.run(["sh", "-c", line], capture_output=True, text=True, check=False)
    assert r.returncode != 0 and not r.stdout


WRITER = """
import sys, time
for i in range(3):
    print(f"out {i}", flush=True)
    print(f"err {i}", file=sys.stderr, flush=True)
    time.sleep(0.05)
sys.stdout.write("no newline at the end")
sys.exit(int(sys.argv[1]))
"""


def test_output_of_several_guests_is_prefixed_line_by_line(
    capfdbinary: pytest.CaptureFixture[bytes],
) -> None:
    out = Prefixed(["debian-11", "centos-7"])
    statuses = run_bounded(
        [("debian-11", 0), ("centos-7", 3)],
        lambda job: out.run(job[0], [sys.executable, "-c", WRITER, str(job[1])]),
        at_once=2,
    )
    assert statuses == [0, 3]
    stdout, stderr = (b.decode().splitlines() for b in capfdbinary.readouterr())
    assert sorted(stdout) == sorted(
        [f"{name} | out {i}" for name in ("debian-11", "centos-7 ") for i in range(3)]
        + ["debian-11 | no newline at the end", "centos-7  | no newline at the end"]
    )
    assert "debian-11 | err 2" in stderr and "centos-7  | err 0" in stderr


def test_several_run_at_once_in_order_with_their_errors() -> None:
    def work(n: int) -> int:
        time.sleep(0.5)
        if n == 2:
            raise HostNotReady("no libvirt")
        return n * 10

    t0 = time.monotonic()
    results = run_bounded([1, 2, 3], work, at_once=3)
    assert time.monotonic() - t0 < 1.2  # not 1.5 s one after the other
    assert results[0] == 10 and results[2] == 30
    assert isinstance(results[1], HostNotReady)


def test_result_lines_and_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    names = ["debian-11", "debian-12", "centos-7"]
    outcomes: list[Outcome | DevboxError] = [
        Outcome("debian-11", 0, 1.25),
        Outcome("debian-12", 255, 0.5),
        HostNotReady("--devbox-accel=kvm but /dev/kvm does not exist"),
    ]
    assert _report(names, outcomes, several=True) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "debian-11: ok (exit 0, 1.2 s)",
        "debian-12: FAILED (ssh could not connect 255, 0.5 s)",
        "centos-7: could not start: --accel=kvm but /dev/kvm does not exist",
    ]
    assert _report(names[:2], outcomes[:1] * 2, several=True) == 0
    capsys.readouterr()
    # One distro: the command's own status, as ssh gives it, and no result line.
    assert _report(["debian-12"], [Outcome("debian-12", 7, 0.1)], several=False) == 7
    assert capsys.readouterr().err == ""

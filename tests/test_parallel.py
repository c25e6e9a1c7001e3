"""Bounded parallel jobs (host/parallel.py) and --devbox-eager as a user sees it (pytester)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from pytest_devbox.errors import DevboxError, ImageBuildError
from pytest_devbox.host.parallel import JOB_OVERHEAD_MIB, available_mib, limit, run_bounded

BAD_URI = "qemu:///system?socket=/nonexistent"


def test_limit_is_bounded_by_cores_memory_and_jobs() -> None:
    job = 1024
    per_job = job + JOB_OVERHEAD_MIB
    assert limit(4, job, cpus=2, free_mib=100 * per_job) == 2  # cores
    assert limit(4, job, cpus=16, free_mib=3 * per_job) == 3  # memory
    assert limit(2, job, cpus=16, free_mib=100 * per_job) == 2  # jobs
    assert limit(4, job, cpus=16, free_mib=10) == 1  # never zero


def test_available_memory_is_read_from_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 8000000 kB\nMemAvailable: 2097152 kB\n")
    assert available_mib(str(meminfo)) == 2048
    assert available_mib(str(tmp_path / "missing")) is None


def test_jobs_run_at_the_same_time_but_no_more_than_the_bound() -> None:
    running = 0
    most = 0
    lock = threading.Lock()

    def work(n: int) -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.3)
        with lock:
            running -= 1
        if n == 2:
            raise ImageBuildError("no template")
        return n * 10

    t0 = time.monotonic()
    results = run_bounded([0, 1, 2, 3], work, 2)
    took = time.monotonic() - t0
    assert most == 2
    assert took < 1.0  # two rounds of 0.3 s, not four
    assert results[:2] == [0, 10] and results[3] == 30
    assert isinstance(results[2], ImageBuildError)


def test_a_bug_in_a_job_is_raised_in_the_caller() -> None:
    def work(n: int) -> int:
        if n:
            raise KeyError(n)
        return n

    with pytest.raises(KeyError):
        run_bounded([0, 1], work, 2)
    assert isinstance(run_bounded([0], lambda n: n, 1)[0], int)
    assert not isinstance(run_bounded([0], lambda n: n, 1)[0], DevboxError)


@pytest.fixture
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PYTEST_DEVBOX", raising=False)
    monkeypatch.setenv("PYTEST_DEVBOX_CACHE", str(tmp_path / "cache"))


@pytest.mark.usefixtures("_clean_env")
@pytest.mark.parametrize("how", ["--devbox-eager", "-o devbox_eager=true"])
def test_eager_starts_the_guests_before_the_first_test(pytester: pytest.Pytester, how: str) -> None:
    pytester.makepyfile(
        """
        def test_plain():
            print("PLAIN RAN")

        def test_one(devbox):
            pass

        def test_fresh(devbox_fresh):
            pass
        """
    )
    result = pytester.runpytest_subprocess(
        "-s", f"--devbox-uri={BAD_URI}", "--devbox=debian-11,debian-12", *how.split()
    )
    out = result.stdout.str()
    # Both guests were asked for at session start, before any test ran...
    assert out.index("devbox: starting debian-11, debian-12") < out.index("PLAIN RAN")
    # ...and the failure is each distro's tests' error, without a second attempt.
    result.assert_outcomes(passed=1, errors=4)
    assert out.count("libvirtd is not running") >= 4


@pytest.mark.usefixtures("_clean_env")
def test_without_eager_images_are_prepared_together_when_a_test_asks(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        def test_plain():
            print("PLAIN RAN")

        def test_one(devbox):
            pass
        """
    )
    result = pytester.runpytest_subprocess(
        "-s", "-p", "no:randomly", f"--devbox-uri={BAD_URI}", "--devbox=debian-11,debian-12"
    )
    out = result.stdout.str()
    result.assert_outcomes(passed=1, errors=2)
    # Once, for both distros, when the first test needing a guest set up.
    assert out.count("devbox: preparing images of debian-11, debian-12") == 1
    assert out.index("PLAIN RAN") < out.index("devbox: preparing images of")
    assert "devbox: starting" not in out

"""What the plugin prints: live progress lines whatever pytest captures (pytester runs)."""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import time
from typing import IO

import pytest

from pytest_devbox.config.profiles import BUILTIN_PROFILES
from pytest_devbox.config.settings import Settings
from pytest_devbox.plugin.report import format_table, summary_rows
from pytest_devbox.plugin.session import DevboxSession
from pytest_devbox.pool.pool import DistroStats

# A fixture that logs through the session, as the pool does while it builds and boots.
CONFTEST = """
import pathlib, time
import pytest
from pytest_devbox.plugin.hooks import state_key

@pytest.fixture
def building(request):
    request.config.stash[state_key].log("building debian-12 image")
    print("the test's own output stays captured")
    go = pathlib.Path("go")
    if request.config.getoption("--wait-for-go"):
        deadline = time.monotonic() + 180
        while not go.exists():
            if time.monotonic() > deadline:
                pytest.fail("nobody saw the progress line")
            time.sleep(0.05)

def pytest_addoption(parser):
    parser.addoption("--wait-for-go", action="store_true")
"""
TEST = "def test_build(building):\n    pass\n"
PROGRESS = "devbox: building debian-12 image"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTEST_DEVBOX", raising=False)


def _is_result_line(line: str) -> bool:
    return "[100%]" in line and ("PASSED" in line or "." in line.split("[")[0])


@pytest.mark.parametrize("args", [[], ["-v"], ["-q"]], ids=["default", "verbose", "quiet"])
def test_progress_shows_before_the_result_without_s(
    pytester: pytest.Pytester, args: list[str]
) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(TEST)
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(passed=1)
    lines = result.outlines
    assert PROGRESS in lines, result.stdout.str()
    results = [i for i, line in enumerate(lines) if _is_result_line(line)]
    assert results, result.stdout.str()
    assert lines.index(PROGRESS) < results[0], result.stdout.str()
    # Only our line escapes the capture: the test's own output is still captured.
    assert "the test's own output stays captured" not in result.stdout.str()


def test_progress_hidden_with_qq(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(TEST)
    result = pytester.runpytest_subprocess("-qq")
    assert result.ret == 0
    assert PROGRESS not in result.outlines


def test_progress_arrives_while_the_fixture_still_runs(pytester: pytest.Pytester) -> None:
    """Flushed at once: the fixture waits until the line has been read through a pipe
    (a CI log), so a line stuck in a buffer fails the test."""
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(TEST)
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--wait-for-go"]
    proc = subprocess.Popen(
        argv, cwd=pytester.path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=os.environ
    )
    assert proc.stdout is not None
    seen = _read_until(proc.stdout, PROGRESS.encode(), timeout=120)
    (pytester.path / "go").touch()
    rest = proc.communicate(timeout=180)[0]
    assert PROGRESS.encode() in seen, (seen + rest).decode()
    assert proc.returncode == 0, (seen + rest).decode()


def _read_until(stream: IO[bytes], wanted: bytes, timeout: float) -> bytes:
    """What `stream` gave until `wanted` appeared or `timeout` passed."""
    fd = stream.fileno()
    data = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while wanted not in data and time.monotonic() < deadline:
            if sel.select(timeout=0.2):
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                data += chunk
    return data


def test_format_table_aligns_text_left_and_numbers_right() -> None:
    rows = [("distro", "boots", "boot", "image"), ("debian-12", "1", "21.5 s", "cached")]
    assert format_table(rows) == [
        "distro     boots    boot  image",
        "debian-12      1  21.5 s  cached",
    ]


def test_the_summary_says_a_boot_was_retried() -> None:
    # The pool counts a retried boot in its DistroStats (test_pool.py proves that on a
    # real guest); the summary row of that distro must show it.
    selected = [BUILTIN_PROFILES["debian-11"], BUILTIN_PROFILES["debian-12"]]
    state = DevboxSession(
        Settings(), dict(BUILTIN_PROFILES), selected, accel="tcg", log=lambda _: None
    )
    state.stats = {
        "debian-11": DistroStats("debian-11", boots=1, boot_seconds=21.0, image_built=False),
        "debian-12": DistroStats(
            "debian-12", boots=1, boot_seconds=95.5, image_built=False, retried=1
        ),
    }
    state.results = {"t.py::test_a[debian-12]": ("debian-12", "passed")}
    # By heading: the table may gain columns (how guests started, ...).
    heading, *rows = summary_rows(state)
    cells = {row[0]: dict(zip(heading, row)) for row in rows}
    assert cells["debian-11"]["image"] == "cached"
    assert cells["debian-12"]["image"] == "cached (retried 1)"
    assert (cells["debian-12"]["boots"], cells["debian-12"]["passed"]) == ("1", "1")
    table = format_table(summary_rows(state))
    assert "cached (retried 1)" in table[2] and table[2].startswith("debian-12 ")

"""The edit-run loop: after `devbox up debian-12`, `pytest --devbox=debian-12
--devbox-reuse` boots nothing, uses that guest, and leaves it up (VM tier)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from guest_session import pytest_on_debian12, system_domains

from pytest_devbox.host.layout import default_cache_dir

pytestmark = pytest.mark.vm
URI = "qemu:///system"
TESTS = """
def test_marks(devbox):
    devbox.run("echo $PPID >> /tmp/runs")
    print("RUNS", devbox.run("wc -l < /tmp/runs").stdout.strip())
"""


def _devbox(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_devbox.cli", *args, f"--cache={default_cache_dir()}"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def test_a_session_reuses_the_guest_devbox_up_started(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.pytest.ini_options]\ndevbox_offline = true\n")
    (tmp_path / "test_loop.py").write_text(TESTS)
    up = _devbox(tmp_path, "up", "debian-12")
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        (name,) = [
            n for n, m in system_domains().items() if m.get("keep") == "1" and n in up.stdout
        ]
        for run in (1, 2):
            r = subprocess.run(
                pytest_on_debian12("--devbox-reuse", "-s", "test_loop.py"),
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=900,
                check=False,
            )
            assert r.returncode == 0, r.stdout + r.stderr
            # No boot: the summary says reused, with 0 boots; the guest's state carried
            # over from the previous run (it is not pristine, and says so).
            assert f"reusing {name}" in r.stdout
            assert f"RUNS {run}" in r.stdout
            row = next(ln for ln in r.stdout.splitlines() if ln.startswith("debian-12 "))
            assert row.split()[1] == "0" and "reused" in row, row
            assert name in system_domains(), "the guest of devbox up must stay up"
    finally:
        _devbox(tmp_path, "destroy", "debian-12")
    assert name not in system_domains()

"""`Machine` and `Pool` work without pytest: the README's promise, run as the user would,
from a plain script importing only the package's public names."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from guest_session import system_domains

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

pytestmark = pytest.mark.vm


def test_a_plain_script_boots_runs_and_stops_a_guest() -> None:
    before = set(system_domains())
    r = subprocess.run(
        [sys.executable, str(EXAMPLES / "without_pytest.py"), "debian-12"],
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    entries = len([p for p in EXAMPLES.iterdir() if not p.name.startswith(".")])
    line = re.search(r"^debian-12: kernel (\S+), /code has (\d+) entries$", r.stdout, re.M)
    assert line, r.stdout
    assert line.group(1).startswith("6.1.")  # Debian 12's kernel
    assert int(line.group(2)) == entries
    assert set(system_domains()) <= before  # the pool stopped its guest

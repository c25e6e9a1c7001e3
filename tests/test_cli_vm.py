"""The devbox command as a person uses it, on real guests, in examples/ (whose
pyproject.toml sets devbox_offline = true: no --offline is typed here)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def devbox(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_devbox.cli", *args],
        cwd=EXAMPLES,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )


def test_up_run_shell_code_on_two_distros_ls_destroy() -> None:
    up = devbox("up", "debian-11,debian-12")
    assert up.returncode == 0, up.stderr
    found = re.findall(r"^(debian-1[12]): (devbox-\S+) is (already )?up: ssh ", up.stdout, re.M)
    assert sorted(d for d, _, _ in found) == ["debian-11", "debian-12"], up.stdout
    ours = [name for _, name, already in found if not already]  # leave others' guests be
    try:
        r = devbox("run", "debian-12", "--", "ls -1 /code; pwd")
        assert r.returncode == 0, r.stderr
        *listed, cwd = r.stdout.splitlines()
        # /code is examples/ itself, shared live: the same entries as on the host.
        assert cwd == "/code" and "hello.c" in listed
        assert set(listed) == {p.name for p in EXAMPLES.iterdir() if not p.name.startswith(".")}

        r = devbox("run", "debian-11,debian-12", "--", "python3 --version | tr a-z A-Z")
        assert r.returncode == 0, r.stderr
        assert re.search(r"^debian-11 \| PYTHON 3\.9\.", r.stdout, re.M), r.stdout
        assert re.search(r"^debian-12 \| PYTHON 3\.11\.", r.stdout, re.M), r.stdout
        assert re.search(r"^debian-11: ok \(exit 0, ", r.stderr, re.M), r.stderr

        r = devbox("run", "debian-11,debian-12", "--", "grep -q ^12 /etc/debian_version")
        assert r.returncode == 1
        assert "debian-11: FAILED (exit 1" in r.stderr and "debian-12: ok (exit 0" in r.stderr

        rows = {row["distro"]: row for row in json.loads(devbox("ls", "--json").stdout)}
        for distro in ("debian-11", "debian-12"):
            assert rows[distro]["state"] == "running" and rows[distro]["kept"]
            # The ssh line ls shows is one a person can paste.
            hop = subprocess.run([*rows[distro]["ssh"], "true"], timeout=60, check=False)
            assert hop.returncode == 0
    finally:
        gone = devbox("destroy", *ours)
    assert gone.returncode == 0, gone.stderr
    left = {row["name"] for row in json.loads(devbox("ls", "--json").stdout)}
    assert not left & set(ours)

"""Per-distro fixtures at any scope, seen from a user's real pytest run (VM tier).

One separate pytest session on debian-11 and debian-12 with a session-scoped and a
module-scoped user fixture built on `devbox`: each runs once per distro, and a distro's
shared guest is stopped before the next distro's tests start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_devbox.host.layout import default_cache_dir

pytestmark = pytest.mark.vm

CONFTEST = """
import json, os
from pathlib import Path

import pytest

from pytest_devbox.virt import domain as dom

LOG = Path(os.environ["PER_DISTRO_LOG"])


def record(**entry):
    with LOG.open("a") as f:
        f.write(json.dumps(entry) + "\\n")


def running_distros():
    conn = dom.connect("qemu:///system")
    try:
        return sorted(
            m["distro"] for _, m in dom.list_devbox_domains(conn)
            if m.get("owner_pid") == str(os.getpid())
        )
    finally:
        conn.close()


@pytest.fixture(scope="session")
def built(devbox):
    record(fixture="session", distro=devbox.distro)
    return devbox.run("uname -r").stdout.strip()


@pytest.fixture
def check(devbox):
    # What runs while this test runs: only its own distro's shared guest.
    record(test=devbox.distro, running=running_distros())
"""

MODULE = """
import pytest

@pytest.fixture(scope="module")
def prepared(devbox):
    from conftest import record
    record(fixture="module", module=__name__, distro=devbox.distro)
    return devbox.distro

def test_a(built, prepared, check):
    assert built

def test_b(built, prepared, check):
    assert prepared
"""


def test_fixtures_of_any_scope_run_once_per_distro_and_guests_stop_in_turn(
    tmp_path: Path,
) -> None:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_one.py").write_text(MODULE)
    (tmp_path / "test_two.py").write_text(MODULE)
    log = tmp_path / "log.jsonl"
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "--devbox=debian-11,debian-12",
        "--devbox-offline",
        f"--devbox-cache={default_cache_dir()}",
        "-v",
    ]
    env = {**os.environ, "PER_DISTRO_LOG": str(log)}
    env.pop("PYTEST_DEVBOX", None)
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    sessions = [e["distro"] for e in entries if e.get("fixture") == "session"]
    modules = [(e["module"], e["distro"]) for e in entries if e.get("fixture") == "module"]
    assert sessions == ["debian-11", "debian-12"]
    assert sorted(modules) == [
        ("test_one", "debian-11"),
        ("test_one", "debian-12"),
        ("test_two", "debian-11"),
        ("test_two", "debian-12"),
    ]
    tests = [e for e in entries if "test" in e]
    # Grouped: every debian-11 test before every debian-12 test...
    assert [e["test"] for e in tests] == ["debian-11"] * 4 + ["debian-12"] * 4
    # ...and while debian-12's tests run, debian-11's guest is gone.
    assert all(e["running"] == [e["test"]] for e in tests), tests
    stopped = out.index("debian-11: stopping the shared guest")
    assert stopped < out.index("test_one.py::test_a[debian-12] PASSED"), out


INTERLEAVE = """
import pytest

@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    # What pytest-randomly and friends do to the distro grouping: alternate distros.
    items.sort(key=lambda item: (item.name.split("[")[0], item.name))
"""

MIXED = """
import json, os

def test_1(devbox):
    with open(os.environ["PER_DISTRO_LOG"], "a") as f:
        f.write(json.dumps([devbox.distro, devbox.name]) + "\\n")

test_2 = test_3 = test_1
"""


def test_interleaved_distros_keep_their_guest_until_their_last_test(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(INTERLEAVE)
    (tmp_path / "test_mixed.py").write_text(MIXED)
    log = tmp_path / "log.jsonl"
    env = {**os.environ, "PER_DISTRO_LOG": str(log)}
    env.pop("PYTEST_DEVBOX", None)
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v",
            "--devbox=debian-11,debian-12", "--devbox-offline",
            f"--devbox-cache={default_cache_dir()}"]  # fmt: skip
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    runs = [json.loads(line) for line in log.read_text().splitlines()]
    order = [distro for distro, _ in runs]
    assert order[:2] in (["debian-11", "debian-12"], ["debian-12", "debian-11"]), order
    # Each distro kept one guest through every switch: booted once, not once a switch.
    for distro in ("debian-11", "debian-12"):
        assert len({name for d, name in runs if d == distro}) == 1, runs
    summary = out[out.index("= devbox =") :]
    for distro in ("debian-11", "debian-12"):
        row = next(line for line in summary.splitlines() if line.startswith(distro))
        # One start in all: a boot, or (9p profiles, the default) a restore.
        cols = row.split()
        assert int(cols[1]) + (int(cols[3]) if cols[3].isdigit() else 0) == 1, summary

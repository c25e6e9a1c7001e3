"""A failed test's evidence: --devbox-artifacts and the distro in JUnit XML."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pytest_devbox.host.layout import default_cache_dir
from pytest_devbox.plugin.forensics import artifacts_dir_for

BAD_URI = "qemu:///system?socket=/nonexistent"


def test_a_node_id_is_one_safe_directory_name(tmp_path: Path) -> None:
    d = artifacts_dir_for(tmp_path, "tests/test_x.py::TestY::test_z[debian-12-a b]")
    assert d.parent == tmp_path
    assert d.name.startswith("tests_test_x.py_TestY_test_z_debian-12-a_b-")


def test_the_distro_is_a_junit_property(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("PYTEST_DEVBOX", raising=False)
    monkeypatch.setenv("PYTEST_DEVBOX_CACHE", str(tmp_path / "cache"))
    pytester.makepyfile("def test_one(devbox):\n    pass\n")
    xml = tmp_path / "junit.xml"
    result = pytester.runpytest_subprocess(
        f"--devbox-uri={BAD_URI}", "--devbox=debian-12", f"--junitxml={xml}",
        f"--devbox-artifacts={tmp_path / 'artifacts'}",
    )  # fmt: skip
    result.assert_outcomes(errors=1)
    props = [(p.get("name"), p.get("value")) for p in ET.parse(xml).iter("property")]
    assert props == [("devbox_distro", "debian-12")]
    assert not (tmp_path / "artifacts").exists()  # no guest ran: nothing to keep


FAILING = """
def test_fails(devbox, devbox_fresh):
    devbox.run("logger devbox-forensics-marker", user="root")
    assert devbox.run("echo 1").stdout.strip() == "2"
"""


@pytest.mark.vm
def test_a_failed_test_leaves_its_guests_evidence(tmp_path: Path) -> None:
    (tmp_path / "test_fail.py").write_text(FAILING)
    artifacts = tmp_path / "artifacts"
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_DEVBOX"}
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--devbox=debian-12",
            "--devbox-offline", f"--devbox-cache={default_cache_dir()}",
            f"--devbox-artifacts={artifacts}"]  # fmt: skip
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    dest = artifacts_dir_for(artifacts, "test_fail.py::test_fails[debian-12]")
    guests = sorted(p.name for p in dest.iterdir())
    assert len(guests) == 2, guests  # the shared guest and the fresh one
    for guest in guests:
        files = {p.name: p.read_text(errors="replace") for p in (dest / guest).iterdir()}
        assert set(files) == {"console.log", "journal.txt", "dmesg.txt", "selinux-denials.txt"}
        assert re.match(r"\[\s*\d+\.\d+\] ", files["dmesg.txt"]), files["dmesg.txt"][:500]
        assert "-- " in files["journal.txt"] or "systemd" in files["journal.txt"]
        assert files["console.log"].strip()
        assert "no SELinux" in files["selinux-denials.txt"]
    journals = [(dest / g / "journal.txt").read_text(errors="replace") for g in guests]
    # The shared guest's journal has what the test logged; the fresh guest's has not.
    assert sorted("devbox-forensics-marker" in j for j in journals) == [False, True]
    assert "devbox artifacts" in out and str(dest) in out, out

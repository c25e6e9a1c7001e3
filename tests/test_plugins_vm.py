"""The pytest plugins users already run, with real guests: testinfra on the handle, the
guest evidence in pytest-html and Allure, pytest-timeout, --pdb, pytest-rerunfailures.

One inner session in .venv-plugins (scripts/plugins-env: the fast tier's .venv has none
of these plugins) runs every case on one shared debian-12 guest; the tests below each
check one part of what it left.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pytest_devbox.host.layout import default_cache_dir

VENV = Path(__file__).resolve().parents[1] / ".venv-plugins"
pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(
        not (VENV / "bin" / "python").exists(),
        reason=f"no {VENV}: run scripts/plugins-env to install the plugins these tests use",
    ),
]

INNER = """
import gc
import os
import pathlib

import paramiko
import pytest

NAMES = []
SEEN = pathlib.Path(__file__).with_name("fresh-guests.txt")


def transports():
    return sum(isinstance(o, paramiko.Transport) and o.is_active() for o in gc.get_objects())


def guest_ssh_sessions(devbox):
    # Established connections to the guest's sshd, counted in the guest.
    out = devbox.run("ss -Htn state established '( sport = :22 )'", user="root", cwd=None)
    return len(out.stdout.splitlines())


# --timeout=5 is for test_sleeps: the others run for longer under emulation.
@pytest.mark.timeout(600)
def test_testinfra(devbox):
    NAMES.append(devbox.name)
    devbox.run("true")  # the devbox user's login exists before counting
    before, in_guest = transports(), guest_ssh_sessions(devbox)
    host = devbox.testinfra
    assert host.package("openssh-server").is_installed
    assert host.file("/etc/os-release").contains("bookworm")
    assert host.service("ssh").is_running
    # The devbox user has the host user's uid (root's here when pytest runs as root).
    assert host.user().uid == os.getuid()
    assert "/code" not in host.check_output("pwd")  # the login's home, as testinfra's own
    root = devbox.testinfra_as("root")
    assert root.check_output("id -un") == "root"
    with host.sudo():
        assert host.check_output("id -un") == "root"
    assert any("dpkg-query" in r.command for r in devbox.history)  # testinfra's, ours
    assert (transports(), guest_ssh_sessions(devbox)) == (before, in_guest)


@pytest.mark.timeout(600)
def test_fails(devbox):
    devbox.run("echo devbox-marker-command")
    assert devbox.run("echo 1").stdout.strip() == "2"


def test_sleeps(devbox):
    devbox.run("sleep 60")


@pytest.mark.timeout(600)
def test_after_the_timeout(devbox):
    assert devbox.name == NAMES[0]  # the same shared guest
    assert devbox.run("echo ok", timeout=30).stdout == "ok\\n"
    # The interrupted command was stopped in the guest, not left running.
    left = devbox.run("pgrep -x sleep", check=False, timeout=30, cwd=None)
    assert left.exit_status == 1, left.stdout


@pytest.mark.timeout(600)
@pytest.mark.flaky(reruns=1)
def test_rerun_gets_a_new_guest(devbox_fresh):
    names = SEEN.read_text().split() if SEEN.exists() else []
    # The overlay is the guest's own: a restored guest keeps its slot's domain name.
    SEEN.write_text(" ".join([*names, str(devbox_fresh.overlay)]))
    assert names, "the first attempt fails on purpose"
    assert str(devbox_fresh.overlay) not in names
"""
# A session of its own: pytest-rerunfailures refuses --pdb, and pytest-timeout stops its
# timers once pdb was entered.
INNER_PDB = """
def test_fails(devbox, devbox_fresh):
    assert devbox.run("echo 1").stdout.strip() == "2"
"""
# pdb's commands at the prompt: the guests are used from inside the debugger.
PDB_INPUT = "\n".join(
    [
        "p devbox.run('echo alive-in-pdb').stdout",
        "p devbox_fresh.run('echo fresh-in-pdb').stdout",
        "c",
        "",
    ]
)


class Inner:
    def __init__(self, root: Path, proc: subprocess.CompletedProcess[str]) -> None:
        self.root = root
        self.out = proc.stdout + proc.stderr
        self.returncode = proc.returncode

    def outcome(self, name: str) -> str:
        m = re.search(rf"test_inner\.py::{name}\[debian-12\] (\w+)", self.out)
        assert m, f"no outcome of {name}:\n{self.out}"
        return m.group(1)


def run_inner(root: Path, source: str, *args: str, stdin: str = "") -> Inner:
    (root / "test_inner.py").write_text(source)
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_DEVBOX"}
    argv = [
        str(VENV / "bin" / "python"), "-m", "pytest", "-p", "no:cacheprovider", "-v",
        "--devbox=debian-12", "--devbox-offline", f"--devbox-cache={default_cache_dir()}",
        *args, "test_inner.py",
    ]  # fmt: skip
    proc = subprocess.run(
        argv, cwd=root, env=env, input=stdin, capture_output=True, text=True, timeout=1800
    )
    return Inner(root, proc)


@pytest.fixture(scope="module")
def inner(tmp_path_factory: pytest.TempPathFactory) -> Inner:
    return run_inner(
        tmp_path_factory.mktemp("plugins"), INNER, "--devbox-artifacts=artifacts",
        "--html=report.html", "--self-contained-html", "--alluredir=allure", "--timeout=5",
    )  # fmt: skip


def test_testinfra_asserts_on_the_guest_without_a_connection_of_its_own(inner: Inner) -> None:
    assert inner.outcome("test_testinfra") == "PASSED", inner.out


def _named_texts(node: Any, found: dict[str, str]) -> None:
    """Every {"name": ..., "content": "data:...;base64,..."} in pytest-html's data."""
    if isinstance(node, dict):
        content, name = node.get("content"), node.get("name")
        if isinstance(content, str) and isinstance(name, str) and "base64," in content:
            text = base64.b64decode(content.split("base64,", 1)[1]).decode(errors="replace")
            found[name] = found.get(name, "") + text
        for value in node.values():
            _named_texts(value, found)
    elif isinstance(node, list):
        for value in node:
            _named_texts(value, found)


def test_the_html_report_has_the_guest_evidence(inner: Inner) -> None:
    page = (inner.root / "report.html").read_text()
    blob = re.search(r'data-jsonblob="([^"]*)"', page)
    assert blob, page[:2000]
    extras: dict[str, str] = {}
    _named_texts(json.loads(html.unescape(blob.group(1))), extras)
    assert "echo devbox-marker-command" in extras["devbox debian-12 commands"], extras.keys()
    assert extras["devbox debian-12 console"].strip()
    journals = [k for k in extras if k.endswith("/journal.txt")]
    assert journals and "systemd" in extras[journals[0]], extras.keys()
    assert any(k.endswith("/dmesg.txt") for k in extras), extras.keys()
    assert any(k.endswith("/selinux-denials.txt") for k in extras), extras.keys()


def test_allure_has_the_guest_evidence_as_attachments(inner: Inner) -> None:
    results = [json.loads(p.read_text()) for p in (inner.root / "allure").glob("*-result.json")]
    failed = [r for r in results if r["name"].startswith("test_fails")]
    assert failed, [r["name"] for r in results]
    files = {a["name"]: inner.root / "allure" / a["source"] for a in failed[0]["attachments"]}
    assert "echo devbox-marker-command" in files["devbox debian-12 commands"].read_text()
    assert files["devbox debian-12 console"].read_text().strip()
    assert any(name.endswith("/journal.txt") for name in files), files.keys()


def test_a_timeout_fails_its_test_and_the_next_on_that_guest_passes(inner: Inner) -> None:
    assert inner.outcome("test_sleeps") == "FAILED", inner.out
    assert "Timeout (>5.0s) from pytest-timeout" in inner.out, inner.out
    assert inner.outcome("test_after_the_timeout") == "PASSED", inner.out


def test_pdb_prints_the_ssh_lines_and_the_guests_are_up_meanwhile(tmp_path: Path) -> None:
    inner = run_inner(tmp_path, INNER_PDB, "--pdb", stdin=PDB_INPUT)
    out = inner.out
    said = out.index("devbox: the guests of this test stay up while the debugger runs")
    ssh_lines = out[said:].splitlines()[1:3]
    assert all(line.strip().startswith("debian-12: ssh ") for line in ssh_lines), out
    assert len(set(ssh_lines)) == 2, ssh_lines  # the shared guest and the fresh one
    assert out.index("(Pdb)", said) > said  # before the prompt
    assert "'alive-in-pdb\\n'" in out and "'fresh-in-pdb\\n'" in out, out
    assert inner.outcome("test_fails") == "FAILED", out


def test_a_rerun_gets_a_new_guest_and_is_counted(inner: Inner) -> None:
    assert inner.outcome("test_rerun_gets_a_new_guest") == "RERUN", inner.out
    names = (inner.root / "fresh-guests.txt").read_text().split()
    assert len(set(names)) == 2, names
    assert "devbox reruns (pytest-rerunfailures): debian-12 1" in inner.out, inner.out

"""pytest-xdist: the controller owns the shared guests and its workers borrow them.

The fast tier checks the broker's protocol and the wiring with an unreachable libvirt;
the VM tier runs `pytest -n 2` for real and counts the domains in libvirt.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_devbox.errors import DevboxError
from pytest_devbox.host.layout import default_cache_dir
from pytest_devbox.plugin.broker import Broker, ask
from pytest_devbox.plugin.session import distro_in_nodeid
from pytest_devbox.virt import domain as dom

pytest.importorskip("xdist")
BAD_URI = "qemu:///system?socket=/nonexistent"


@pytest.fixture
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PYTEST_DEVBOX", raising=False)
    monkeypatch.setenv("PYTEST_DEVBOX_CACHE", str(tmp_path / "cache"))


def test_the_broker_answers_and_remembers_a_failure() -> None:
    asked: list[str] = []

    def start(distro: str) -> dict[str, object]:
        asked.append(distro)
        if distro == "centos-7":
            raise DevboxError("no template for centos-7")
        return {"name": f"devbox-{distro}-x", "port": 2222}

    broker = Broker(start)
    try:
        assert ask(str(broker.path), "debian-12") == {"name": "devbox-debian-12-x", "port": 2222}
        for _ in range(2):
            with pytest.raises(DevboxError, match="no template for centos-7"):
                ask(str(broker.path), "centos-7")
        assert asked == ["debian-12", "centos-7"]  # the failure is not retried
        assert oct(broker.path.parent.stat().st_mode & 0o777) == "0o700"
    finally:
        broker.close()
    assert not broker.path.parent.exists()
    with pytest.raises(DevboxError, match="cannot reach the pytest-xdist controller"):
        ask(str(broker.path), "debian-12")


@pytest.mark.usefixtures("_clean_env")
def test_workers_get_the_controllers_error_once(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.parametrize("n", range(4))
        def test_shared(devbox, n):
            pass
        """
    )
    # -rN: no short summary, whose lines are cut to the terminal's width except in CI.
    result = pytester.runpytest_subprocess(
        "-n", "2", f"--devbox-uri={BAD_URI}", "--devbox=debian-12", "-rN"
    )
    result.assert_outcomes(errors=4)
    out = result.stdout.str()
    # The controller tried once; every worker's test got that one error.
    assert out.count("devbox: could not start debian-12: libvirtd is not running") == 4
    result.stdout.fnmatch_lines(["debian-12 * 0 * - * - * 0 * 4 * 0"])


@pytest.mark.usefixtures("_clean_env")
def test_without_xdist_nothing_changes(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_shared(devbox):\n    pass\n")
    result = pytester.runpytest_subprocess(
        "-p", "no:xdist", f"--devbox-uri={BAD_URI}", "--devbox=debian-12"
    )
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*devbox: could not start debian-12: libvirtd is not running*"])


# --- VM tier: real guests under -n 2 -------------------------------------------------

INNER = """
import json, os
from pathlib import Path

import pytest

from pytest_devbox.virt import domain as dom

LOG = Path(os.environ["XDIST_LOG"])


def ours():
    # Every devbox domain of this run: the controller's (our parent) and the workers'.
    conn = dom.connect("qemu:///system")
    try:
        return [
            (n, m["distro"], m["owner_pid"]) for n, m in dom.list_devbox_domains(conn)
            if m.get("owner_pid") in (str(os.getppid()), str(os.getpid()))
        ]
    finally:
        conn.close()


def record(**entry):
    entry.update(worker=os.environ.get("PYTEST_XDIST_WORKER"), pid=os.getpid(),
                 controller=os.getppid(), domains=ours())
    with LOG.open("a") as f:
        f.write(json.dumps(entry) + "\\n")


@pytest.mark.parametrize("n", range(4))
def test_shared(devbox, n):
    assert devbox.run("cat /etc/hostname").stdout.strip() == "devbox-debian-12"
    record(test="shared", name=devbox.name)


def test_fresh(devbox_fresh):
    devbox_fresh.run("true")
    record(test="fresh", name=devbox_fresh.name)


def test_crash(devbox_fresh, devbox):
    record(test="crash", name=devbox.name, fresh=devbox_fresh.name)
    os._exit(3)  # a worker dies holding a shared guest's connection and a fresh guest
"""


@pytest.mark.vm
def test_xdist_run_shares_one_guest_and_a_crashed_worker_leaks_nothing(tmp_path: Path) -> None:
    (tmp_path / "test_inner.py").write_text(INNER)
    log = tmp_path / "log.jsonl"
    env = {**os.environ, "XDIST_LOG": str(log)}
    env.pop("PYTEST_DEVBOX", None)
    argv = [
        sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "-p", "no:randomly",
        "--devbox=debian-12", "--devbox-offline", f"--devbox-cache={default_cache_dir()}",
    ]  # fmt: skip
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    out = proc.stdout + proc.stderr
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    shared = {e["name"] for e in entries if e["test"] in ("shared", "crash")}
    assert len(shared) == 1, entries  # one shared guest for every worker
    workers = {e["worker"] for e in entries if e["test"] == "shared"}
    controller = {e["controller"] for e in entries}
    assert len(controller) == 1
    for e in entries:
        # Never more than one shared guest (the controller's) in libvirt during the run.
        owned = [d for d in e["domains"] if d[2] == str(e["controller"])]
        assert [d[0] for d in owned] == list(shared), e
    assert "crashed while running 'test_inner.py::test_crash[debian-12]'" in out, out
    assert proc.returncode == 1, out  # the crashed test failed; the others passed
    print(f"workers used: {sorted(w for w in workers if w)}")
    # Nothing of the run is left: not the controller's guest, not the dead worker's one.
    pids = {str(e["pid"]) for e in entries} | {str(p) for p in controller}
    conn = dom.connect("qemu:///system")
    try:
        left = [n for n, m in dom.list_devbox_domains(conn) if m.get("owner_pid") in pids]
    finally:
        conn.close()
    assert not left, left
    # The controller's summary counts the real boots: its shared guest and two fresh ones.
    summary = out[out.index("= devbox =") :]
    assert "debian-12" in summary
    row = next(line for line in summary.splitlines() if line.startswith("debian-12"))
    # A crashed worker reports nothing: test_fresh's boot counts if its worker lived on.
    fresh_pid = next(e["pid"] for e in entries if e["test"] == "fresh")
    crash_pid = next(e["pid"] for e in entries if e["test"] == "crash")
    # Started by booting, or (9p profiles, the default) by restoring: the two columns.
    cols = row.split()
    started = int(cols[1]) + (int(cols[3]) if cols[3].isdigit() else 0)
    assert started == (2 if fresh_pid != crash_pid else 1), summary
    assert row.split()[-3:] == ["5", "1", "0"], summary  # the crash counts as a failure


def test_the_distro_of_a_crashed_tests_id() -> None:
    names = ["debian-11", "debian-11-9p", "debian-12"]
    assert distro_in_nodeid("t.py::test_x[debian-12]", names) == "debian-12"
    assert distro_in_nodeid("t.py::test_x[debian-11-9p-3]", names) == "debian-11-9p"
    assert distro_in_nodeid("t.py::test_x[3-debian-11]", names) == "debian-11"
    assert distro_in_nodeid("t.py::test_x", names) is None
    assert distro_in_nodeid("t.py::test_x[centos-7]", names) is None


@pytest.mark.vm
def test_ctrl_c_under_xdist_leaves_no_guest(tmp_path: Path) -> None:
    started = tmp_path / "started"
    (tmp_path / "test_slow.py").write_text(
        "import json, os, pathlib, time\n\n"
        "def test_slow(devbox, devbox_fresh):\n"
        "    devbox.run('true')\n"
        f"    pathlib.Path({str(started)!r}).write_text(json.dumps([os.getppid(), os.getpid()]))\n"
        "    time.sleep(600)\n"
    )
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2",
            "--devbox=debian-12", "--devbox-offline",
            f"--devbox-cache={default_cache_dir()}"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_DEVBOX"}
    out = tmp_path / "pytest.log"
    log = out.open("w")
    proc = subprocess.Popen(
        argv, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 900
        while not started.exists():
            assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
            time.sleep(0.5)
        owners = {str(pid) for pid in json.loads(started.read_text())}
        assert len(_owned(owners)) == 2  # the controller's shared guest, the worker's fresh one
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log.close()
    assert not _owned(owners), out.read_text()


def _owned(pids: set[str]) -> list[str]:
    conn = dom.connect("qemu:///system")
    try:
        return [n for n, m in dom.list_devbox_domains(conn) if m.get("owner_pid") in pids]
    finally:
        conn.close()

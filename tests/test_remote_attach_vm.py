"""Attaching to guests on a remote libvirt host, VM tier: pytest-xdist workers on the
controller's remote guest, and `devbox up` / `pytest --devbox-reuse` / `devbox ls` /
`devbox destroy` on a guest the hosts map puts on the remote host.

The remote host is a private sshd on loopback in front of this host's libvirtd
(remote_host.py). One boot per test: the controller's shared guest, `devbox up`'s guest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from guest_session import system_domains
from guests import CACHE
from remote_host import RemoteHost, pool_volumes, remote_host

pytestmark = pytest.mark.vm
pytest.importorskip("xdist")


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteHost]:
    with remote_host(tmp_path_factory.mktemp("remote-host")) as host:
        yield host


WORKERS = """
import json, os
from pathlib import Path

import pytest

from pytest_devbox.virt import domain as dom

LOG = Path(os.environ["XDIST_LOG"])


def controllerssystem_domains():
    conn = dom.connect("qemu:///system")
    try:
        return [n for n, m in dom.list_devbox_domains(conn)
                if m.get("owner_pid") == str(os.getppid())]
    finally:
        conn.close()


@pytest.mark.parametrize("n", range(4))
def test_shared(devbox, n):
    worker = os.environ.get("PYTEST_XDIST_WORKER", "none")
    Path(f"from-{worker}-{n}.txt").write_text(f"{worker} {n}\\n")
    devbox.sync()  # a remote guest's /code is a copy: this worker brings it up to date
    assert devbox.run(f"cat /code/from-{worker}-{n}.txt").stdout == f"{worker} {n}\\n"
    assert devbox.run("hostname").stdout.strip() == "devbox-debian-12"
    entry = dict(worker=worker, name=devbox.name, remote=devbox.remote,
                 share=devbox.share, domains=controllerssystem_domains())
    with LOG.open("a") as f:
        f.write(json.dumps(entry) + "\\n")
"""


def test_xdist_workers_share_one_remote_guest_and_sync_it(
    remote: RemoteHost, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(test_workers=WORKERS)
    log = pytester.path / "log.jsonl"
    monkeypatch.setenv("XDIST_LOG", str(log))
    monkeypatch.delenv("PYTEST_DEVBOX", raising=False)
    result = pytester.runpytest_subprocess(
        "-n", "2", "-p", "no:randomly", "-p", "no:cacheprovider", "--devbox=debian-12",
        "--devbox-offline", f"--devbox-cache={CACHE}", f"--devbox-uri={remote.uri}",
        f"--devbox-remote-pool={remote.pool_dir}", timeout=1800,
    )  # fmt: skip
    out = result.stdout.str()
    result.assert_outcomes(passed=4)
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    names = {e["name"] for e in entries}
    assert len(names) == 1, entries  # one shared guest for both workers
    assert {e["worker"] for e in entries} == {"gw0", "gw1"}, entries
    for e in entries:
        # Reached through the tunnel of the remote host, its /code a copy.
        assert e["remote"] and e["remote"].startswith("root@127.0.0.1:"), e
        assert e["share"] == "sync", e
        assert e["domains"] == sorted(names), e  # never a second guest of the controller
    assert "copied into the guest" in out
    assert not names & set(system_domains()), "the controller's guest goes with the run"


LOOP = """
from pathlib import Path

def test_loop(devbox):
    assert devbox.run("cat /code/edited.txt").stdout == Path("edited.txt").read_text()
    devbox.run("echo $PPID >> /tmp/runs")
    print("RUNS", devbox.run("wc -l < /tmp/runs").stdout.strip(), "REMOTE", devbox.remote)
"""


def _devbox(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_devbox.cli", args[0], f"--cache={CACHE}", *args[1:]],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )


def test_devbox_up_reuse_ls_and_destroy_on_the_host_the_hosts_map_names(
    remote: RemoteHost, tmp_path: Path
) -> None:
    """--devbox-uri stays local: only the hosts map sends debian-12 to the remote host."""
    (tmp_path / "pyproject.toml").write_text(
        "[tool.pytest.ini_options]\ndevbox_offline = true\n"
        f'devbox_remote_pool = "{remote.pool_dir}"\n\n'
        f'[tool.pytest-devbox.hosts]\n"debian-12" = "{remote.uri}"\n'
    )
    (tmp_path / "test_loop.py").write_text(LOOP)
    (tmp_path / "edited.txt").write_text("first\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_DEVBOX"}
    up = _devbox(tmp_path, "up", "debian-12")
    assert up.returncode == 0, up.stdout + up.stderr
    (name,) = [n for n, m in system_domains().items() if m.get("keep") == "1" and n in up.stdout]
    try:
        assert "ProxyCommand=" in up.stdout  # its ssh line goes through the remote host
        ls = _devbox(tmp_path, "ls", "--json")
        (row,) = [r for r in json.loads(ls.stdout) if r["name"] == name]
        assert row["uri"] == remote.uri and row["host"].startswith("root@127.0.0.1:"), row
        assert row["kept"] and row["ssh"], row
        for run, text in ((1, "first\n"), (2, "second\n")):
            (tmp_path / "edited.txt").write_text(text)  # reuse syncs it before the tests
            r = subprocess.run(
                [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-s",
                 "--devbox=debian-12", "--devbox-reuse", f"--devbox-cache={CACHE}",
                 "test_loop.py"],
                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200, check=False,
            )  # fmt: skip
            assert r.returncode == 0, r.stdout + r.stderr
            assert f"reusing {name}" in r.stdout
            assert f"RUNS {run} REMOTE root@127.0.0.1:" in r.stdout
        # `devbox run` refreshes the kept sync guest through the tunnel, then runs.
        (tmp_path / "edited.txt").write_text("third\n")
        ran = _devbox(tmp_path, "run", "debian-12", "--", "cat", "edited.txt")
        assert ran.returncode == 0 and ran.stdout == "third\n", ran.stdout + ran.stderr
        mine = [v for v in pool_volumes(remote.pool_dir) if v.startswith(name + "@")]
        assert len(mine) == 2, mine  # its overlay and console
    finally:
        gone = _devbox(tmp_path, "destroy", "debian-12")
    assert gone.returncode == 0 and f"destroyed {name} (debian-12)" in gone.stdout, gone.stderr
    assert name not in system_domains()
    assert not [v for v in pool_volumes(remote.pool_dir) if v.startswith(name + "@")]

"""Topologies on real guests (VM tier): a client on debian-11 (9p) reaches a server on
debian-12 over their private network, by address and by role name; a guest of another
topology running at the same time (three roles, so through its hub) cannot reach them;
kill -9 of the pytest session leaves no guest and no socket of the link behind;
--devbox-keep-failed keeps a whole group; xdist workers start their own groups.

Each test runs pytest sessions of its own with the plugin (the marker and the fixture
as a user has them). The first run on a cache saves each end's guests once.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from guest_session import NINE_P_PROJECT, system_domains

from pytest_devbox.host.layout import default_cache_dir
from pytest_devbox.virt import domain as dom

pytestmark = pytest.mark.vm

URI = "qemu:///system"
PROJECT = NINE_P_PROJECT
# Shared by the sessions' test files: a web server on the server role, started in the
# background as the devbox user; and a client that fetches from it.
HELPERS = """
import json, os, shlex, time
from pathlib import Path

SERVE = ("mkdir -p /tmp/www && echo {token} > /tmp/www/token && "
         "nohup python3 -m http.server {port} --directory /tmp/www >/dev/null 2>&1 & "
         "for i in $(seq 50); do "
         "python3 -c 'import socket; socket.create_connection((\\"127.0.0.1\\", {port}), 1)' "
         "2>/dev/null && exit 0; sleep 0.2; done; exit 1")
FETCH = ("python3 -c 'import sys, urllib.request; "
         "print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode().strip())' {url}")

def serve(guest, port, token):
    guest.run(SERVE.format(port=port, token=token))

def fetch(guest, url):
    return guest.run(FETCH.format(url=url), check=False)

# A UDP listener on the private network: every datagram it gets, broadcasts included,
# goes to /tmp/udp.log. What another topology's guests send must never arrive here.
LISTENER = ('import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); '
            's.bind(("", 9999)); '
            '[open("/tmp/udp.log", "ab").write(s.recv(100) + b" ") for _ in iter(int, 1)]')
SENDER = ('import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); '
          's.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1); '
          '[s.sendto(sys.argv[1].encode(), (to, 9999)) for _ in range(20) for to in sys.argv[2:]]')

def listen(guest):
    guest.run(f"nohup python3 -c {shlex.quote(LISTENER)} >/dev/null 2>&1 & "
              "for i in $(seq 50); do ss -lun | grep -q ':9999 ' && exit 0; sleep 0.2; done; "
              "exit 1")

def send(guest, text, *to):
    guest.run(f"python3 -c {shlex.quote(SENDER)} {text} {' '.join(to)}")

def heard(guest):
    return guest.run("cat /tmp/udp.log 2>/dev/null", check=False).stdout

def signal_ready(data):
    Path(os.environ["TOPO_READY"]).write_text(json.dumps(data))

def wait_done():
    done = Path(os.environ["TOPO_DONE"])
    deadline = time.monotonic() + 900
    while not done.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
"""
HOLDING = """
import pytest
from helpers import fetch, heard, listen, serve, signal_ready, wait_done

@pytest.mark.devbox_topology(server="debian-12", client="debian-11-9p")
def test_holds(devbox_topology):
    server, client = devbox_topology["server"], devbox_topology["client"]
    assert server.address == "10.77.0.1" and client.address == "10.77.0.2"
    serve(server, 8077, "from-a")
    listen(server)
    listen(client)
    by_address = fetch(client, f"http://{server.address}:8077/token")
    assert by_address.stdout.strip() == "from-a", by_address
    by_name = fetch(client, "http://server:8077/token")
    assert by_name.stdout.strip() == "from-a", by_name
    hosts = client.run("getent hosts server client").stdout.split()
    assert hosts == ["10.77.0.1", "server", "10.77.0.2", "client"], hosts
    signal_ready({role: g.name for role, g in devbox_topology.items()})
    wait_done()
    # Nothing the other topology sent (unicast to these addresses, broadcast) got here.
    assert "from-b" not in heard(server) + heard(client)
"""
OTHER = """
import time

import pytest
from helpers import fetch, heard, listen, send, serve

# Three roles: their frames go through the group's hub (two have a direct link).
@pytest.mark.devbox_topology(server="debian-12", client="debian-11-9p", peer="debian-12")
def test_sees_only_its_own(devbox_topology):
    server, client, peer = (devbox_topology[r] for r in ("server", "client", "peer"))
    assert peer.address == "10.77.0.3"
    serve(server, 8078, "from-b")
    # Its own network works, between any two of its guests ...
    assert fetch(client, f"http://{server.address}:8078/token").stdout.strip() == "from-b"
    assert fetch(peer, "http://server:8078/token").stdout.strip() == "from-b"
    # ... and the other topology's server (same address, port 8077) is not on it: the
    # address is this topology's server, which does not listen there.
    other = fetch(client, f"http://{server.address}:8077/token")
    assert other.exit_status != 0 and "from-a" not in other.stdout, other
    assert "from-a" not in fetch(server, "http://10.77.0.1:8077/token").stdout
    # Datagrams to every address and the broadcast address reach this topology's own
    # listeners (the probe works); the holding topology checks that none reached it.
    listen(server)
    listen(peer)
    send(client, "from-b", "10.77.0.1", "10.77.0.2", "10.77.0.3", "10.77.0.255")
    for _ in range(20):
        if "from-b" in heard(server) and "from-b" in heard(peer):
            break
        time.sleep(0.5)
    assert "from-b" in heard(server) and "from-b" in heard(peer)
"""


# Two topologies under pytest-xdist: each test's group is started by the worker that
# runs it, and records which worker that was.
XDIST = """
import os
import pytest
from helpers import fetch, serve

@pytest.mark.devbox_topology(server="debian-12", client="debian-11-9p")
def test_one(devbox_topology):
    serve(devbox_topology["server"], 8079, os.environ["PYTEST_XDIST_WORKER"])
    got = fetch(devbox_topology["client"], "http://server:8079/token").stdout.strip()
    assert got == os.environ["PYTEST_XDIST_WORKER"]

@pytest.mark.devbox_topology(server="debian-11-9p", client="debian-12")
def test_other(devbox_topology):
    test_one(devbox_topology)
"""
# A group of the user's own scope: one per module, shared by its tests, gone after it.
MODULE = """
import pytest
from helpers import fetch, serve
from pytest_devbox import topology

@pytest.fixture(scope="module")
def pair(devbox_pool):
    with topology(devbox_pool, {"server": "debian-12", "client": "debian-11-9p"}) as group:
        yield group

def test_first(pair):
    serve(pair["server"], 8080, "kept-for-the-module")

def test_second_sees_the_same_group(pair):
    got = fetch(pair["client"], "http://server:8080/token").stdout.strip()
    assert got == "kept-for-the-module"
    print("GROUP", " ".join(g.name for g in pair.values()))
"""
FAILING = """
import pytest

@pytest.mark.devbox_topology(server="debian-12", client="debian-11-9p")
def test_fails(devbox_topology):
    devbox_topology["server"].run("touch /tmp/kept-here")
    assert devbox_topology["client"].address == "nowhere"
"""


def _project(tmp_path: Path, name: str, test: str) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "pyproject.toml").write_text(textwrap.dedent(PROJECT))
    (d / "helpers.py").write_text(HELPERS)
    (d / "test_it.py").write_text(test)
    return d


def _session(project: Path, env: dict[str, str], *extra: str) -> subprocess.Popen[str]:
    argv = [
        sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:randomly",
        "--devbox=debian-12,debian-11-9p", "--devbox-offline",
        f"--devbox-cache={default_cache_dir()}", "-v", "-rs", *extra, "test_it.py",
    ]  # fmt: skip
    return subprocess.Popen(
        argv,
        cwd=project,
        env={**os.environ, "PYTHONPATH": str(project), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a job of its own, as in a terminal
    )


def _wait_ready(proc: subprocess.Popen[str], ready: Path, timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"the holding session ended before it was ready:\n{out}")
        assert time.monotonic() < deadline, "the holding session is not ready"
        time.sleep(0.5)
    time.sleep(0.2)  # written whole by then (one small write)
    names: dict[str, str] = json.loads(ready.read_text())
    return names


def _link_ports(names: dict[str, str]) -> set[int]:
    """The UDP ports the guests' QEMUs bound on 127.0.0.1 for their private link."""
    conn = dom.connect(URI)
    try:
        ports = set()
        for name in names.values():
            root = ET.fromstring(conn.lookupByName(name).XMLDesc(0))
            local = root.find("devices/interface[@type='udp']/source/local")
            assert local is not None, f"{name} has no private link NIC"
            ports.add(int(local.get("port", "0")))
        return ports
    finally:
        conn.close()


def _udp_ports_bound() -> set[int]:
    ports = set()
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with open(table) as f:
            for line in list(f)[1:]:
                ports.add(int(line.split()[1].rsplit(":", 1)[1], 16))
    return ports


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)


def test_client_reaches_server_and_another_topology_cannot(tmp_path: Path) -> None:
    ready, done = tmp_path / "ready", tmp_path / "done"
    env = {"TOPO_READY": str(ready), "TOPO_DONE": str(done)}
    a = _session(_project(tmp_path, "a", HOLDING), env)
    try:
        _wait_ready(a, ready, 1200)
        b = _session(_project(tmp_path, "b", OTHER), env)
        out_b, _ = b.communicate(timeout=1200)
        done.write_text("")
        out_a, _ = a.communicate(timeout=300)
    finally:
        done.write_text("")
        _stop(a)
    assert a.returncode == 0, out_a
    assert b.returncode == 0, out_b
    assert "1 passed" in out_a and "1 passed" in out_b


def test_kill_9_leaves_no_guest_and_no_link_socket(tmp_path: Path) -> None:
    ready, done = tmp_path / "ready", tmp_path / "done"
    proc = _session(
        _project(tmp_path, "a", HOLDING), {"TOPO_READY": str(ready), "TOPO_DONE": str(done)}
    )
    try:
        names = _wait_ready(proc, ready, 1200)
        ports = _link_ports(names)
        assert len(ports) == 2 and ports <= _udp_ports_bound()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 30
        while set(names.values()) & set(system_domains()):
            assert time.monotonic() < deadline, f"{names} still run 30 s after kill -9"
            time.sleep(0.5)
        assert not ports & _udp_ports_bound(), "a link socket outlived its guests"
    finally:
        _stop(proc)


def _devbox(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "pytest_devbox.cli", *args, "--cache", str(default_cache_dir())]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def test_keep_failed_keeps_the_whole_group_with_ssh_lines(tmp_path: Path) -> None:
    proc = _session(_project(tmp_path, "a", FAILING), {}, "--devbox-keep-failed")
    out, _ = proc.communicate(timeout=1200)
    ours = [n for n, m in system_domains().items() if m.get("owner_pid") == str(proc.pid)]
    try:
        assert proc.returncode == 1, out
        assert len(ours) == 2, out  # the server and the client, nothing else
        lines = {n: next(ln for ln in out.splitlines() if n in ln and "kept running" in ln)
                 for n in ours}  # fmt: skip
        probes = {}
        for name, line in lines.items():
            argv = shlex.split(line.split("): ", 1)[1])
            probes[name] = subprocess.run(
                [*argv, "-o", "BatchMode=yes", "ls /tmp; getent hosts server"],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
        # Both reachable by their lines; the server has what the test left; both still
        # name the server on their private network.
        assert all(p.returncode == 0 for p in probes.values()), probes
        assert sum("kept-here" in p.stdout.split() for p in probes.values()) == 1, probes
        assert all("10.77.0.1" in p.stdout for p in probes.values()), probes
    finally:
        destroyed = _devbox("destroy", *ours) if ours else None
    assert destroyed is not None and destroyed.returncode == 0, destroyed
    assert not set(ours) & set(system_domains())


def test_topologies_under_xdist_belong_to_their_worker(tmp_path: Path) -> None:
    pytest.importorskip("xdist")
    proc = _session(_project(tmp_path, "a", XDIST), {}, "-n", "2")
    out, _ = proc.communicate(timeout=1200)
    assert proc.returncode == 0 and "2 passed" in out, out
    # Both ran in workers (each client fetched the token its own worker's server wrote).
    passed = [ln for ln in out.splitlines() if "PASSED" in ln and ln.startswith("[gw")]
    assert len(passed) == 2, out


def test_a_group_of_module_scope_serves_the_module_and_goes_after_it(tmp_path: Path) -> None:
    proc = _session(_project(tmp_path, "a", MODULE), {}, "-s")
    out, _ = proc.communicate(timeout=1200)
    assert proc.returncode == 0 and "2 passed" in out, out
    names = next(ln.split("GROUP ")[1].split()[:2] for ln in out.splitlines() if "GROUP " in ln)
    assert len(names) == 2 and not set(names) & set(system_domains()), out

"""The SSH layer against a real OpenSSH server started on 127.0.0.1 for this session."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from local_sshd import HAVE_SSHD, Sshd, free_port, host_key, local_connection, run_sshd

from pytest_devbox.errors import CommandFailed, CommandTimeout, HostKeyMismatch, SSHError
from pytest_devbox.result import Result
from pytest_devbox.transport.exec_channel import HISTORY_KEEP, OUTPUT_LIMIT
from pytest_devbox.transport.keys import ensure_keypair, public_key_line
from pytest_devbox.transport.logins import Login
from pytest_devbox.transport.ssh import Connection, probe_banner

pytestmark = pytest.mark.skipif(
    not HAVE_SSHD, reason="needs OpenSSH server and ssh-keygen (apt-get install openssh-server)"
)


@pytest.fixture(scope="session")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ssh") / "keys"


@pytest.fixture(scope="session")
def client_key(keydir: Path) -> Path:
    return ensure_keypair(keydir)


@pytest.fixture(scope="session")
def authorized_keys(client_key: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("authorized") / "authorized_keys"
    path.write_text(public_key_line(client_key) + "\n")
    return path


@pytest.fixture(scope="session")
def sshd(authorized_keys: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    work = tmp_path_factory.mktemp("sshd")
    with run_sshd(work, authorized_keys, host_key(work / "host_ed25519")) as server:
        yield server


def _connection(port: int, key: Path, known_hosts: Path, alias: str = "img-1") -> Connection:
    return local_connection(port, key, known_hosts, alias)


@pytest.fixture(scope="session")
def session_conn(
    sshd: Sshd, client_key: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Connection]:
    known_hosts = tmp_path_factory.mktemp("known") / "known_hosts"
    conn = _connection(sshd.port, client_key, known_hosts)
    conn.connect(timeout=10)
    yield conn
    conn.close()


@pytest.fixture
def conn(session_conn: Connection) -> Connection:
    if not session_conn.connected:  # a test closed it on purpose
        session_conn.connect(timeout=10)
    return session_conn


@pytest.fixture(scope="session")
def logins(session_conn: Connection) -> Iterator[dict[str, Login]]:
    """One Login per exec mode on the session's connection: their executors live on."""
    made = {"ssh": Login(session_conn, "ssh"), "executor": Login(session_conn, "auto")}
    yield made
    made["executor"].close()


@pytest.fixture(params=["ssh", "executor"])
def runner(request: pytest.FixtureRequest, conn: Connection, logins: dict[str, Login]) -> Login:
    """Where a command-semantics test runs its commands: both paths, the same tests."""
    login = logins[request.param]
    if request.param == "executor":
        assert login.executor() is not None, login.fallback
    return login


def _remote_processes(pattern: str) -> str:
    # The "remote" side is this very host, so pgrep here sees the guest's processes.
    return subprocess.run(
        ["pgrep", "-af", pattern], capture_output=True, text=True, check=False
    ).stdout


def _marker() -> str:
    """A sleep no other process on this host runs (other test sessions share it)."""
    return f"sleep 100.{uuid.uuid4().int % 10**9:09d}"


def _wait_until(cond: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Poll ``cond``: a busy host may take seconds to reap what was killed."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _gone(marker: str) -> bool:
    return _wait_until(lambda: _remote_processes(marker) == "")


# --- commands ----------------------------------------------------------------------------


def test_echo_and_result_fields(runner: Login) -> None:
    r = runner.run("echo hello; echo oops >&2", cwd=None)
    assert r == Result("echo hello; echo oops >&2", 0, "hello\n", "oops\n", r.duration)
    assert r.ok and not r.failed
    assert 0 < r.duration < 60  # measured, not a benchmark: a busy host is slow
    assert runner.history[-1] is r


def test_exit_codes_without_check(runner: Login) -> None:
    for status in (0, 1, 3, 255):
        r = runner.run(f"exit {status}", check=False, cwd=None)
        assert r.exit_status == status
        assert r.ok is (status == 0)


def test_command_failed_shows_command_status_and_tails(runner: Login) -> None:
    cmd = "for i in $(seq 1 50); do echo line$i; done; echo 'it broke' >&2; exit 7"
    with pytest.raises(CommandFailed) as info:
        runner.run(cmd, cwd=None)
    message = str(info.value)
    assert f"command `{cmd}` exited with status 7" in message
    assert "line50" in message and "line20\n" not in message  # only the tail
    assert "--- stderr ---\nit broke" in message
    assert info.value.result.exit_status == 7
    assert runner.history[-1] is info.value.result


def test_ten_megabytes_of_output_do_not_deadlock(runner: Login) -> None:
    size = 10 * 1024 * 1024
    cmd = (
        f"head -c {size} /dev/zero | tr '\\0' x; head -c 300000 /dev/zero | tr '\\0' e >&2; exit 3"
    )
    r = runner.run(cmd, check=False, cwd=None, timeout=60)
    assert r.exit_status == 3
    assert len(r.stdout) == size and set(r.stdout) == {"x"}
    assert len(r.stderr) == 300000 and set(r.stderr) == {"e"}
    with pytest.raises(CommandFailed) as info:
        runner.run(cmd, cwd=None, timeout=60)
    assert info.value.result.exit_status == 3
    assert "exited with status 3" in str(info.value)


def test_finding_18_output_keeps_its_head_and_tail_within_the_limit(runner: Login) -> None:
    # 10000 bytes of stdout, numbered lines, and 3000 of stderr: a limit of 1000 each.
    cmd = "seq -w 0 1999 | head -c 10000; head -c 3000 /dev/zero | tr '\\0' e >&2"
    r = runner.run(cmd, cwd=None, timeout=60, output_limit=1000)
    lines = "".join(f"{i:04d}\n" for i in range(2000))
    assert r.stdout == lines[:500] + "\n... 9000 bytes dropped ...\n" + lines[-500:]
    assert r.stderr == "e" * 500 + "\n... 2000 bytes dropped ...\n" + "e" * 500
    assert runner.run("echo small", cwd=None, output_limit=1000).stdout == "small\n"
    # By default 64 MiB a stream: a `dd` to stdout cannot exhaust the pytest process.
    r = runner.run("head -c 70000000 /dev/zero", cwd=None, timeout=120)
    dropped = 70_000_000 - OUTPUT_LIMIT
    assert len(r.stdout) == OUTPUT_LIMIT + len(f"\n... {dropped} bytes dropped ...\n")
    assert f"... {dropped} bytes dropped ..." in r.stdout
    # The login's history (20 Results, for failure reports) keeps a short copy of it.
    kept = runner.history[-1]
    assert kept.command == r.command and kept.stdout.endswith(r.stdout[-HISTORY_KEEP:])
    assert len(kept.stdout) < HISTORY_KEEP + 100
    small = runner.run("echo small", cwd=None)
    assert runner.history[-1] is small


def test_invalid_utf8_is_replaced(runner: Login) -> None:
    r = runner.run(r"printf 'a\377b'", cwd=None)
    assert r.stdout == "a\ufffdb"


def test_timeout_kills_the_remote_command(runner: Login) -> None:
    marker = _marker()
    start = time.monotonic()
    with pytest.raises(CommandTimeout) as info:
        runner.run(f"echo started; {marker}; echo never", timeout=2, cwd=None)
    elapsed = time.monotonic() - start
    assert 1.9 < elapsed < 60  # the timeout, not the 100 s the command wanted
    assert info.value.result.exit_status is None
    assert info.value.result.stdout == "started\n"
    assert "timed out after 2 s" in str(info.value)
    assert marker in str(info.value)
    assert _gone(marker), _remote_processes(marker)
    assert runner.run("echo still here", cwd=None).stdout == "still here\n"


def test_timeout_kills_background_children_too(runner: Login) -> None:
    marker = _marker()
    with pytest.raises(CommandTimeout):
        runner.run(f"{marker} & {marker} & wait", timeout=1, cwd=None)
    assert _gone(marker), _remote_processes(marker)


def test_timeout_not_hit(runner: Login) -> None:
    r = runner.run("sleep 0.2; echo done", timeout=5, cwd=None)
    assert r.stdout == "done\n"


def test_list_commands_are_quoted(runner: Login) -> None:
    args = ["a b", "it's", '"double"', "$HOME", "`id`", "semi;colon", "", "*"]
    r = runner.run(["printf", "[%s]\\n", *args], cwd=None)
    assert r.stdout.splitlines() == [f"[{a}]" for a in args]
    assert r.command.startswith("printf '[%s]\\n' 'a b' ")


def test_cwd(runner: Login, tmp_path: Path) -> None:
    odd = tmp_path / "dir with 'quote'"
    odd.mkdir()
    assert runner.run("pwd", cwd=str(odd)).stdout == f"{odd}\n"
    r = runner.run("pwd", cwd=str(tmp_path / "missing"), check=False)
    assert r.exit_status != 0 and "missing" in r.stderr
    # The default is /code, the share: a command fails clearly where it is absent.
    if not os.path.isdir("/code"):
        with pytest.raises(CommandFailed, match="/code"):
            runner.run("pwd")


def test_env(runner: Login) -> None:
    env = {"GREETING": "hello world", "TRICKY": "$HOME 'q' \"d\"", "EMPTY": ""}
    r = runner.run('printf "%s|%s|%s" "$GREETING" "$TRICKY" "${EMPTY-unset}"', env=env, cwd=None)
    assert r.stdout == "hello world|$HOME 'q' \"d\"|"
    with pytest.raises(ValueError, match="invalid environment variable name"):
        runner.run("true", env={"A B": "x"}, cwd=None)


def test_stdin(runner: Login) -> None:
    assert runner.run("tr a-z A-Z", stdin="hello\n", cwd=None).stdout == "HELLO\n"
    blob = bytes(range(256)) * 8192  # 2 MiB, more than a channel window
    r = runner.run("wc -c", stdin=blob, cwd=None, timeout=30)
    assert r.stdout.strip() == str(len(blob))
    # Without stdin a command reads end-of-file instead of hanging.
    assert runner.run("cat", cwd=None, timeout=5).stdout == ""


@pytest.mark.skipif(shutil.which("sudo") is None, reason="needs sudo on this host")
def test_user_runs_through_sudo(runner: Login) -> None:
    r = runner.run("id -un; pwd; echo $FOO", user="nobody", env={"FOO": "bar"}, cwd="/tmp")
    assert r.stdout == "nobody\n/tmp\nbar\n"
    r = runner.run("echo out; echo err >&2; exit 4", user="nobody", cwd=None, check=False)
    assert (r.stdout, r.stderr, r.exit_status) == ("out\n", "err\n", 4)
    assert runner.run("cat", user="nobody", stdin="piped", cwd=None).stdout == "piped"
    # sudo -H's environment: the user's own home and names, not the caller's.
    r = runner.run('echo "$HOME $USER $LOGNAME"', user="nobody", cwd=None)
    assert r.stdout == f"{pwd.getpwnam('nobody').pw_dir} nobody nobody\n"
    r = runner.run("true", user="no-such-user-4242", cwd=None, check=False)
    assert r.exit_status == 1 and "no-such-user-4242" in r.stderr


@pytest.mark.skipif(shutil.which("sudo") is None, reason="needs sudo on this host")
def test_timeout_stops_a_command_run_through_sudo(runner: Login) -> None:
    marker = _marker()
    with pytest.raises(CommandTimeout):
        runner.run(f"{marker}; true", user="nobody", timeout=1, cwd=None)
    assert _gone(marker), _remote_processes(marker)


def test_put_get_round_trip(conn: Connection, tmp_path: Path) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)
    src = tmp_path / "src.bin"
    src.write_bytes(payload)
    src.chmod(0o750)
    remote = tmp_path / "remote dir"
    remote.mkdir()
    conn.put(src, str(remote / "copy.bin"))
    assert (remote / "copy.bin").stat().st_mode & 0o777 == 0o750
    back = tmp_path / "back.bin"
    conn.get(str(remote / "copy.bin"), back)
    assert back.read_bytes() == payload
    with pytest.raises(SSHError, match="no/such/dir"):
        conn.put(src, "/no/such/dir/x")
    with pytest.raises(SSHError, match="/no/such/file"):
        conn.get("/no/such/file", tmp_path / "x")


def test_history_is_short(runner: Login) -> None:
    for i in range(22):
        runner.run(f"echo {i}", cwd=None)
    assert len(runner.history) == 20
    assert runner.history[-1].stdout == "21\n"


# --- connection --------------------------------------------------------------------------


def test_reconnects_once_when_the_transport_died(conn: Connection) -> None:
    dead = conn._transport
    assert dead is not None
    dead.close()  # what a dropped connection looks like to us
    assert not conn.connected
    assert conn.run("echo back", cwd=None).stdout == "back\n"
    # It really reconnected: a new transport, the dead one left behind.
    assert conn.connected
    assert conn._transport is not None and conn._transport is not dead
    assert not dead.is_active()


def test_connection_lost_mid_command_is_an_ssh_error(conn: Connection) -> None:
    transport = conn._transport
    assert transport is not None
    marker = _marker()

    def drop_once_running() -> None:
        # Not a fixed timer: on a busy host the command may not have started yet, and a
        # close before it starts is a reconnect, not a drop mid-command.
        if _wait_until(lambda: marker in _remote_processes(marker), 60):
            transport.close()

    dropper = threading.Thread(target=drop_once_running)
    dropper.start()
    try:
        with pytest.raises(SSHError, match="dropped while running"):
            conn.run(marker, cwd=None, timeout=120)
    finally:
        dropper.join()
        # A dropped connection cannot stop what it ran (sshd leaves pty-less commands be).
        subprocess.run(["pkill", "-f", marker.replace(".", "[.]")], check=False)
    assert conn.run("echo ok", cwd=None).stdout == "ok\n"
    assert conn._transport is not transport


def test_host_key_pinning(
    sshd: Sshd, authorized_keys: Path, client_key: Path, tmp_path: Path
) -> None:
    known_hosts = tmp_path / "state" / "known_hosts"
    first = _connection(sshd.port, client_key, known_hosts, alias="debian-12-abc")
    first.connect(timeout=10)
    first.close()
    pinned = known_hosts.read_text()
    host_pub = Path(str(sshd.host_key) + ".pub").read_text().split()
    assert pinned.split() == ["debian-12-abc", host_pub[0], host_pub[1]]
    # Same key again: accepted, file unchanged.
    first.connect(timeout=10)
    first.close()
    assert known_hosts.read_text() == pinned
    # Another server (another port) claiming the same alias with another key: refused.
    with run_sshd(
        tmp_path / "other", authorized_keys, host_key(tmp_path / "other_host_key")
    ) as other:
        impostor = _connection(other.port, client_key, known_hosts, alias="debian-12-abc")
        with pytest.raises(HostKeyMismatch) as info:
            impostor.connect(timeout=10)
        message = str(info.value)
        assert str(known_hosts) in message and "debian-12-abc" in message
        assert "ssh-keygen -R debian-12-abc -f" in message
        # A different alias is a different pin: fine.
        _connection(other.port, client_key, known_hosts, alias="debian-12-def").connect(10)
    assert "debian-12-def" in known_hosts.read_text()


def test_refused_key_is_a_clear_ssh_error(sshd: Sshd, tmp_path: Path) -> None:
    stranger = ensure_keypair(tmp_path / "stranger")
    with pytest.raises(SSHError, match="refused the key"):
        _connection(sshd.port, stranger, tmp_path / "kh").connect(timeout=10)


def test_no_server_is_a_clear_ssh_error(client_key: Path, tmp_path: Path) -> None:
    port = free_port()
    with pytest.raises(SSHError, match=f"cannot reach SSH at 127.0.0.1:{port}"):
        _connection(port, client_key, tmp_path / "kh").connect(timeout=2)


def test_silent_server_is_a_banner_error(client_key: Path, tmp_path: Path) -> None:
    # Like QEMU's user network before the guest's sshd runs: accepts, says nothing.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert probe_banner("127.0.0.1", port, 0.5) is False
        start = time.monotonic()
        with pytest.raises(SSHError, match="handshake"):
            _connection(port, client_key, tmp_path / "kh").connect(timeout=1)
        assert time.monotonic() - start < 60  # the 1 s timeout, not a hang


def test_probe_banner(sshd: Sshd) -> None:
    assert probe_banner("127.0.0.1", sshd.port, 5) is True
    assert probe_banner("127.0.0.1", free_port(), 1) is False


def test_dead_server_fails_clearly_after_one_reconnect(
    authorized_keys: Path, client_key: Path, tmp_path: Path
) -> None:
    with run_sshd(tmp_path / "s", authorized_keys, host_key(tmp_path / "hk")) as server:
        c = _connection(server.port, client_key, tmp_path / "kh")
        c.connect(timeout=10)
        assert c.run("echo up", cwd=None).stdout == "up\n"
        # pkill by the parent's pid only: the per-connection sshd children die too.
        subprocess.run(["pkill", "-P", str(server.process.pid)], check=False)
        server.process.terminate()
        server.process.wait(10)
    assert _wait_until(lambda: not c.connected), "the client never saw the server go"
    with pytest.raises(SSHError, match="cannot reach SSH"):
        c.run("echo down", cwd=None)


def test_ssh_command_works_with_openssh(conn: Connection) -> None:
    if shutil.which("ssh") is None:
        pytest.skip("needs the OpenSSH client")
    argv = conn.ssh_command()
    assert argv[0] == "ssh"
    done = subprocess.run(
        [*argv, "-o", "BatchMode=yes", "true"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    out = subprocess.run(
        [*argv, "-o", "BatchMode=yes", "echo", "hi"], capture_output=True, text=True, timeout=30
    )
    assert out.stdout == "hi\n"


def _ssh_config(ssh_argv: list[str], config: Path) -> dict[str, list[str]]:
    """What real OpenSSH makes of ``ssh_argv`` with ``config`` as the user's ssh config."""
    done = subprocess.run(
        ["ssh", "-G", "-F", str(config), *ssh_argv[1:]],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    seen: dict[str, list[str]] = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition(" ")
        seen.setdefault(key, []).append(value)
    return seen


@pytest.mark.skipif(shutil.which("ssh") is None, reason="needs the OpenSSH client")
def test_finding_8_the_ssh_line_forwards_nothing_of_the_users_session(
    conn: Connection, tmp_path: Path
) -> None:
    # A common ~/.ssh/config: the user's agent and X display to every host, and more.
    config = tmp_path / "config"
    config.write_text(
        "Host *\n  ForwardAgent yes\n  ForwardX11 yes\n  LocalForward 5555 127.0.0.1:22\n"
        "  RemoteForward 6666 127.0.0.1:22\n  PermitLocalCommand yes\n  LocalCommand touch x\n"
    )
    seen = _ssh_config(conn.ssh_command(), config)
    assert seen["forwardagent"] == ["no"] and seen["forwardx11"] == ["no"]
    assert seen["clearallforwardings"] == ["yes"] and seen["permitlocalcommand"] == ["no"]
    assert "localforward" not in seen and "remoteforward" not in seen
    # Without the line's options that config does forward (the test's premise).
    plain = _ssh_config(["ssh", f"{conn.username}@{conn.host}"], config)
    assert plain["forwardagent"] == ["yes"] and "localforward" in plain


@pytest.mark.skipif(shutil.which("ssh") is None, reason="needs the OpenSSH client")
def test_finding_27_a_known_hosts_path_with_whitespace_stays_one_file(
    sshd: Sshd, client_key: Path, tmp_path: Path
) -> None:
    known_hosts = tmp_path / "cache dir" / "100% pinned" / "known_hosts"
    known_hosts.parent.mkdir(parents=True)
    c = _connection(sshd.port, client_key, known_hosts, alias="spaced")
    c.connect(timeout=10)  # pins the key there
    c.close()
    argv = c.ssh_command()
    seen = _ssh_config(argv, Path("/dev/null"))
    assert seen["userknownhostsfile"] == [str(known_hosts)]
    # StrictHostKeyChecking=yes: only the pinned file lets real ssh in.
    done = subprocess.run(
        [*argv, "-F", "/dev/null", "-o", "BatchMode=yes", "echo", "in"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.stdout == "in\n", done.stderr

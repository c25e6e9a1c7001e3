"""The resident executor (issue 11): against a real local sshd, and on a debian-12 guest.

tests/test_ssh.py runs every command-semantics test through both paths; here are what
only the executor has: one process serving many threads, its death and replacement,
the fallback where no Python 3 exists, and the guest program's Python 3.6 syntax.
"""

from __future__ import annotations

import ast
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from guest_session import pytest_on_debian12
from local_sshd import HAVE_SSHD, Sshd, client_files, host_key, local_connection, run_sshd, username

from pytest_devbox.config.resolve import Places, resolve
from pytest_devbox.errors import CommandTimeout, SSHError
from pytest_devbox.guest.machine import Machine
from pytest_devbox.transport import executor_guest
from pytest_devbox.transport.executor import ExecutorLost
from pytest_devbox.transport.logins import Login
from pytest_devbox.transport.ssh import Connection

needs_sshd = pytest.mark.skipif(not HAVE_SSHD, reason="needs OpenSSH server and ssh-keygen")


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return client_files(tmp_path_factory.mktemp("client"))


@pytest.fixture(scope="module")
def sshd(client: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    work = tmp_path_factory.mktemp("sshd")
    # OpenSSH's default MaxSessions: the executor's channel must fit beside the others.
    with run_sshd(work, client[1], host_key(work / "hk"), max_sessions=10) as server:
        yield server


def _connection(sshd: Sshd, client: tuple[Path, Path], tmp_path: Path, alias: str) -> Connection:
    """A connection (not yet open) to the local sshd as this user."""
    return local_connection(sshd.port, client[0], tmp_path / "known_hosts", alias)


@pytest.fixture
def login(sshd: Sshd, client: tuple[Path, Path], tmp_path: Path) -> Iterator[Login]:
    conn = _connection(sshd, client, tmp_path, "exec")
    conn.connect(timeout=10)
    made = Login(conn, "auto")
    yield made
    made.close()


def _marker() -> str:
    """A sleep no other process on this host runs (other test sessions share it)."""
    return f"sleep 100.{uuid.uuid4().int % 10**9:09d}"


def _gone(marker: str, timeout: float = 30.0) -> bool:
    """True once no process runs ``marker`` (a busy host may take seconds to reap)."""
    deadline = time.monotonic() + timeout
    while subprocess.run(["pgrep", "-f", marker], capture_output=True, check=False).returncode == 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _hammer(login: Login | Machine, threads: int, commands: int) -> list[str]:
    """``commands`` echoes from each of ``threads`` threads; what went wrong, if anything."""
    problems: list[str] = []
    barrier = threading.Barrier(threads)

    def worker(t: int) -> None:
        barrier.wait()
        for i in range(commands):
            token = f"t{t}-c{i}"
            try:
                r = login.run(
                    f"echo {token}; echo {token}-err >&2; exit {i % 3}", check=False, cwd=None
                )
                if (r.stdout, r.stderr, r.exit_status) != (f"{token}\n", f"{token}-err\n", i % 3):
                    problems.append(f"{token}: {r!r}")
            except Exception as e:
                problems.append(f"{token}: {e!r}")

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    return problems


def test_guest_program_is_python_3_6() -> None:
    # CentOS 8's platform-python is 3.6: the syntax must parse there.
    source = Path(executor_guest.__file__).read_text()
    ast.parse(source, feature_version=(3, 6))
    assert source.startswith("# devbox-executor")  # how `pgrep -f` finds it in a guest


def test_exec_option_reaches_settings(tmp_path: Path) -> None:
    places = Places(tmp_path, tmp_path, tmp_path)
    assert resolve({}, lambda _: "", places, env={}).settings.exec_mode == "auto"
    ini = {"devbox_exec": "ssh"}
    assert resolve({}, lambda n: ini.get(n, ""), places, env={}).settings.exec_mode == "ssh"
    with pytest.raises(pytest.UsageError, match="use auto or ssh"):
        resolve({"exec_mode": "rsh"}, lambda _: "", places, env={})


@needs_sshd
def test_threads_share_one_executor(login: Login) -> None:
    first = login.executor()
    assert first is not None
    assert _hammer(login, 8, 25) == []
    assert login.executor() is first  # one process served all 200
    assert len(login.history) == 20


@needs_sshd
def test_a_warm_shell_runs_a_command_like_sh_c(login: Login) -> None:
    login.run("true", cwd=None)
    time.sleep(1)  # the executor starts the next shell ahead meanwhile
    r = login.run("tr '\\0' ' ' < /proc/$$/cmdline", cwd=None)
    assert "read -r __n" in r.stdout  # this one ran in a warm shell
    time.sleep(1)
    script = "printf '[%s]' 'a\\b' '  x  ' \"$1\"\n\necho \"$0 ${__s-u}${__n-u}${__l-u}\"; cat"
    r = login.run(script, cwd=None, stdin="line 1\nline 2", env={"V": "1"})
    assert r.stdout == "[a\\b][  x  ][]sh uuu\nline 1\nline 2"
    time.sleep(1)
    r = login.run("if true", cwd=None, check=False)
    assert r.exit_status == 2 and "Syntax error" in r.stderr


@needs_sshd
def test_commands_run_at_once(login: Login) -> None:
    start = time.monotonic()
    threads = [
        threading.Thread(target=login.run, args=("sleep 1",), kwargs={"cwd": None})
        for _ in range(6)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert time.monotonic() - start < 3.5  # 6 s if they ran one after another


@needs_sshd
def test_a_killed_executor_is_reported_and_replaced(login: Login) -> None:
    first = login.executor()
    assert first is not None
    marker = _marker()
    with pytest.raises(ExecutorLost) as info:
        login.run(f"echo before; kill -KILL $PPID; {marker}", cwd=None)
    message = str(info.value)
    assert f"executor of {username()}@127.0.0.1" in message
    assert f"(guest pid {first.pid}) ended while running `echo before;" in message
    assert "killed by a signal" in message and "starts a new executor" in message
    assert isinstance(info.value, SSHError)
    assert login.run("echo again", cwd=None).stdout == "again\n"
    second = login.executor()
    assert second is not None and second.pid != first.pid
    subprocess.run(["pkill", "-f", marker], check=False)


@needs_sshd
def test_a_dropped_connection_ends_the_executor_clearly(login: Login) -> None:
    assert login.executor() is not None
    transport = login.conn._transport
    assert transport is not None
    threading.Timer(0.5, transport.close).start()
    marker = _marker()
    with pytest.raises(ExecutorLost, match=f"ended while running `{re.escape(marker)}`"):
        login.run(marker, cwd=None, timeout=120)
    # A new transport and a new executor; the old one stopped its command on its way out.
    assert login.run("echo ok", cwd=None).stdout == "ok\n"
    assert _gone(marker)


@needs_sshd
def test_closing_the_login_stops_its_commands(login: Login) -> None:
    seen: list[BaseException] = []
    marker = _marker()

    def sleeper() -> None:
        try:
            login.run(marker, cwd=None)
        except SSHError as e:
            seen.append(e)

    done = threading.Thread(target=sleeper)
    done.start()
    time.sleep(1)
    login.close()
    done.join(10)
    assert len(seen) == 1
    assert f"ended while running `{marker}`: the login was closed" in str(seen[0])
    assert _gone(marker)


@needs_sshd
def test_no_python_falls_back_to_ssh_with_one_log_line(
    sshd: Sshd, client: tuple[Path, Path], tmp_path: Path
) -> None:
    conn = _connection(sshd, client, tmp_path, "nopy")
    lines: list[str] = []
    # Like CentOS 7: neither interpreter the executor needs exists there.
    no_python = Login(conn, "auto", lines.append, pythons=("/nonexistent/python3",))
    for _ in range(3):
        assert no_python.run("echo plain", cwd=None).stdout == "plain\n"
    assert no_python.executor() is None
    assert no_python.fallback == "no python3 or platform-python"
    assert lines == [
        f"devbox: {username()}@127.0.0.1:{sshd.port}: no executor (no python3 or "
        "platform-python); commands run over plain SSH"
    ]
    no_python.close()


@needs_sshd
def test_mode_ssh_starts_no_executor(login: Login) -> None:
    plain = Login(login.conn, "ssh")
    assert plain.run("echo $PPID", cwd=None).stdout.strip().isdigit()
    assert plain.executor() is None and plain.fallback is None


# --- on a real guest ----------------------------------------------------------------------


@pytest.mark.vm
def test_debian12_runs_commands_through_executors(debian12: Machine) -> None:
    logins = debian12._logins
    for user in (None, "root"):
        login, _ = logins.login_for(user)
        executor = login.executor()
        assert executor is not None, login.fallback
        assert executor.python == "3.11"
    assert debian12.run("id -un", cwd=None).stdout == "devbox\n"
    assert debian12.run("id -un", user="root", cwd=None).stdout == "root\n"
    assert debian12.run("id -un", user="nobody", cwd=None).stdout == "nobody\n"


@pytest.mark.vm
def test_debian12_200_commands_from_8_threads(debian12: Machine) -> None:
    start = time.monotonic()
    assert _hammer(debian12, 8, 25) == []
    print(f"200 commands from 8 threads in {time.monotonic() - start:.1f} s")


@pytest.mark.vm
def test_debian12_killed_executor_is_replaced_and_timeouts_stop_groups(
    debian12: Machine,
) -> None:
    login, _ = debian12._logins.login_for(None)
    first = login.executor()
    assert first is not None
    with pytest.raises(ExecutorLost, match="killed by a signal"):
        debian12.run("kill -KILL $PPID", cwd=None)
    assert debian12.run("echo again", cwd=None).stdout == "again\n"
    second = login.executor()
    assert second is not None and second.pid != first.pid
    with pytest.raises(CommandTimeout, match="timed out after 2 s"):
        debian12.run("sleep 100.5151 & sleep 100.5151; wait", cwd=None, timeout=2)
    left = debian12.run("pgrep -f 'sleep 100[.]5151'", cwd=None, check=False)
    assert left.exit_status == 1, left.stdout


def test_guest_program_stops_on_sigterm_free_of_leftovers() -> None:
    # The guest side run here, fed a frame by hand: a real process, no SSH in between.
    proc = subprocess.Popen(
        ["python3", "-I", "-S", "-c", Path(executor_guest.__file__).read_text()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    hello = proc.stdout.read(executor_guest.HEADER.size)
    _, kind, size = executor_guest.HEADER.unpack(hello)
    assert kind == executor_guest.READY
    assert proc.stdout.read(size).startswith(executor_guest.HELLO)
    marker = _marker()
    spec = f'{{"argv": ["sh", "-c", "{marker}"], "stdin": false}}'.encode()
    proc.stdin.write(executor_guest.HEADER.pack(1, executor_guest.START, len(spec)) + spec)
    proc.stdin.flush()
    time.sleep(1)
    proc.stdin.close()  # what a closed channel looks like to it
    assert proc.wait(30) == 0
    assert _gone(marker)


MODES = """
def test_mode(devbox):
    login, _ = devbox._logins.login_for(None)
    assert devbox.run("echo hi").stdout == "hi\\n"
    print(f"MODE {login.mode} executor={login.executor() is not None}")
"""


@pytest.mark.vm
def test_devbox_exec_ssh_reaches_the_logins(tmp_path: Path) -> None:
    (tmp_path / "test_modes.py").write_text(MODES)
    r = subprocess.run(
        pytest_on_debian12("-s", "-q", "--devbox-exec=ssh", "test_modes.py"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "MODE ssh executor=False" in r.stdout


def _python_3_6() -> str | None:
    """A real CPython 3.6 on this host (CentOS 8's platform-python is 3.6.8), if any."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates = [str(p) for p in sorted(pyenv.glob("3.6*/bin/python3.6"))]
    found = shutil.which("python3.6")
    if found and "/shims/" not in found:  # a pyenv shim needs pyenv's environment
        candidates.append(found)
    return next((c for c in candidates if os.access(c, os.X_OK)), None)


PY36 = _python_3_6()


@needs_sshd
@pytest.mark.skipif(PY36 is None, reason="no CPython 3.6 on this host (pyenv install 3.6)")
def test_the_executor_runs_on_python_3_6(
    sshd: Sshd, client: tuple[Path, Path], tmp_path: Path
) -> None:
    # The guest program on the interpreter CentOS 8 has (its platform-python is 3.6),
    # which cannot boot here: the same program, a real 3.6, over a real sshd.
    assert PY36 is not None
    conn = _connection(sshd, client, tmp_path, "py36")
    lines: list[str] = []
    old = Login(conn, "auto", lines.append, pythons=(PY36,))
    try:
        executor = old.executor()
        assert executor is not None, lines
        assert executor.python.startswith("3.6"), executor.python
        r = old.run("echo out; echo err >&2; exit 3", check=False, cwd=str(tmp_path))
        assert (r.stdout, r.stderr, r.exit_status) == ("out\n", "err\n", 3)
        assert old.run("cat", stdin="fed\n", cwd=None).stdout == "fed\n"
        assert old.run("pwd", cwd=str(tmp_path)).stdout == f"{tmp_path}\n"
        assert old.run("echo $X", env={"X": "y z"}, cwd=None).stdout == "y z\n"
        big = old.run("head -c 10000000 /dev/zero | tr '\\0' a", cwd=None).stdout
        assert len(big) == 10_000_000 and set(big) == {"a"}
        marker = _marker()
        with pytest.raises(CommandTimeout):
            old.run(f"{marker} & {marker}; wait", timeout=1, cwd=None)
        assert _gone(marker), "the timed-out command's process group outlived it"
        assert _hammer(old, 8, 10) == []
        assert old.executor() is executor and lines == []  # one executor served all
    finally:
        old.close()


def test_a_write_event_for_a_stream_closed_earlier_in_its_batch_is_ignored() -> None:
    # Defect (seen in CI): one select() batch held the stdin end and a write event for
    # the same command; the first fed and closed its stdin, the second then raised
    # ValueError from the selector and ended the executor with the command in flight.
    ex = executor_guest.Executor()
    proc = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        command = executor_guest.Command(1, proc)
        assert proc.stdin is not None
        proc.stdin.close()
        ex.feed(command)  # must not raise
        assert not command.pending
    finally:
        proc.kill()
        proc.wait()
        ex.warm.stop()


# --- the guest program as a local process fed framed input ------------------------------


class GuestProgram:
    """executor_guest.py run here by ``python`` on pipes, as sshd would run it: frames
    in on its stdin, frames out of its stdout; no SSH in between."""

    def __init__(self, python: str = "python3") -> None:
        self.proc = subprocess.Popen(
            [python, "-I", "-S", "-c", Path(executor_guest.__file__).read_text()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        kind, hello = self._frame()[1:]
        assert kind == executor_guest.READY and hello.startswith(executor_guest.HELLO)
        self.pid = int(hello[len(executor_guest.HELLO) :].split()[0])

    def _frame(self) -> tuple[int, int, bytes]:
        assert self.proc.stdout is not None
        header = self.proc.stdout.read(executor_guest.HEADER.size)
        if len(header) < executor_guest.HEADER.size:
            raise EOFError(self.proc.stderr.read().decode() if self.proc.stderr else "")
        call, kind, size = executor_guest.HEADER.unpack(header)
        return call, kind, self.proc.stdout.read(size)

    def start(self, call: int, argv: list[str], user: str | None = None) -> None:
        spec = json.dumps({"argv": argv, "stdin": False, "user": user}).encode()
        assert self.proc.stdin is not None
        self.proc.stdin.write(executor_guest.HEADER.pack(call, executor_guest.START, len(spec)))
        self.proc.stdin.write(spec)
        self.proc.stdin.flush()

    def results(self, *calls: int) -> dict[int, tuple[bytes, bytes, int | None]]:
        """(stdout, stderr, status) of each of ``calls``, read until all have ended."""
        out: dict[int, list[bytes]] = {c: [b"", b""] for c in calls}
        done: dict[int, tuple[bytes, bytes, int | None]] = {}
        while len(done) < len(calls):
            call, kind, payload = self._frame()
            if kind == executor_guest.OUT:
                out[call][0] += payload
            elif kind == executor_guest.ERR:
                out[call][1] += payload
            elif kind == executor_guest.EXIT:
                done[call] = (out[call][0], out[call][1], json.loads(payload)["status"])
        return done

    def close(self) -> int:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        code = self.proc.wait(30)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return code


@pytest.fixture
def guest_program() -> Iterator[GuestProgram]:
    program = GuestProgram()
    yield program
    if program.proc.poll() is None:
        program.close()


@pytest.mark.parametrize("user", [None, "nobody"])
def test_finding_16_a_command_that_cannot_spawn_fails_alone(
    guest_program: GuestProgram, user: str | None
) -> None:
    if user is not None and os.geteuid() != 0:
        pytest.skip("switching users needs root")
    guest_program.start(1, ["sh", "-c", "sleep 1; echo done"])
    guest_program.start(2, ["echo", "a\0b"], user=user)  # ValueError: embedded null byte
    guest_program.start(3, ["sh", "-c", "echo next"], user=user)
    got = guest_program.results(1, 2, 3)
    assert got[1] == (b"done\n", b"", 0)  # the neighbour in flight is unharmed
    out, err, status = got[2]
    assert (out, status) == (b"", 1) and b"devbox executor: cannot run it" in err
    assert b"embedded null byte" in err
    assert got[3] == (b"next\n", b"", 0)  # and the executor goes on
    assert guest_program.close() == 0


def test_finding_16_the_host_refuses_a_nul_before_sending() -> None:
    from pytest_devbox.transport.exec_channel import shell_argv

    with pytest.raises(ValueError, match="NUL"):
        shell_argv("echo a\0b", None, None, None)
    with pytest.raises(ValueError, match="NUL"):
        shell_argv("true", "/co\0de", None, None)
    with pytest.raises(ValueError, match="NUL"):
        shell_argv("true", None, {"X": "a\0"}, None)


def _other_user() -> str | None:
    """A user of this host with supplementary groups, to see them all arrive."""
    for entry in pwd.getpwall():
        if len(os.getgrouplist(entry.pw_name, entry.pw_gid)) > 1:
            return entry.pw_name
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
@pytest.mark.parametrize("python", ["python3", "3.6"])
def test_finding_28_the_user_switch_gives_uid_gid_and_groups(python: str) -> None:
    # >= 3.9: subprocess's user=/group=/extra_groups= (no Python code in the child);
    # 3.6-3.8 (CentOS 8): a preexec_fn of system calls only, the groups looked up first.
    if python == "3.6":
        if PY36 is None:
            pytest.skip("no CPython 3.6 on this host (pyenv install 3.6)")
        python = PY36
    program = GuestProgram(python)
    try:
        users = ["nobody", *filter(None, [_other_user()])]
        for call, name in enumerate(users, 1):
            program.start(call, ["sh", "-c", 'id -u; id -g; id -G; echo "$HOME $USER"'], name)
        got = program.results(*range(1, len(users) + 1))
        for call, name in enumerate(users, 1):
            entry = pwd.getpwnam(name)
            groups = os.getgrouplist(name, entry.pw_gid)
            want = f"{entry.pw_uid}\n{entry.pw_gid}\n{' '.join(map(str, groups))}\n"
            want += f"{entry.pw_dir} {name}\n"
            assert got[call] == (want.encode(), b"", 0), name
    finally:
        program.close()
    switch = executor_guest.as_user("nobody")
    assert "preexec_fn" not in switch and switch["user"] == pwd.getpwnam("nobody").pw_uid


def test_finding_29_a_sigkilled_executor_leaves_no_command_running(
    guest_program: GuestProgram,
) -> None:
    marker = _marker()
    # A shell and the sleep it started: the whole group goes, not only its leader.
    guest_program.start(1, ["sh", "-c", f"{marker}; echo never"])
    guest_program.start(2, ["sh", "-c", f"{marker} & wait"])
    deadline = time.monotonic() + 30
    sleeps = ["pgrep", "-fc", f"^{marker}"]  # the sleeps, not the shells that run them
    while subprocess.run(sleeps, capture_output=True, text=True).stdout != "2\n":
        assert time.monotonic() < deadline, "the commands did not start"
        time.sleep(0.05)
    os.kill(guest_program.pid, signal.SIGKILL)
    assert guest_program.proc.wait(30) == -signal.SIGKILL
    assert _gone(marker), "a command outlived its SIGKILLed executor"


class _CutShort:
    """The executor's real channel, but its first big sendall sends part of the frame
    and then raises, as a SIGALRM (pytest-timeout) or Ctrl-C would in the middle."""

    def __init__(self, channel: Any) -> None:
        self._real = channel
        self.cut = False

    def sendall(self, data: bytes) -> None:
        if not self.cut and len(data) > 4096:
            self.cut = True
            self._real.sendall(data[:1000])
            raise KeyboardInterrupt
        self._real.sendall(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@needs_sshd
def test_finding_17_a_frame_cut_short_ends_that_executor_not_the_next_command(
    login: Login,
) -> None:
    first = login.executor()
    assert first is not None
    first._channel = _CutShort(first._channel)  # type: ignore[assignment]
    with pytest.raises(KeyboardInterrupt):
        login.run("cat", stdin=b"x" * 100_000, cwd=None)
    assert first.dead is not None and "cut short" in first.dead
    # A torn stream would hang this or make it fail; a new executor runs it.
    assert login.run("echo next", cwd=None, timeout=20).stdout == "next\n"
    second = login.executor()
    assert second is not None and second is not first and second.pid != first.pid

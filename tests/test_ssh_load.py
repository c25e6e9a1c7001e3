"""One Connection used from many threads at once (issue 16).

Fast tier: a real local sshd whose MaxSessions is below the connection's channel limit,
so the server refuses channel opens, as a guest's sshd does under load. VM tier: the
same load through the `devbox` fixture on a real debian-12 guest.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from guest_session import pytest_on_debian12
from local_sshd import HAVE_SSHD, Sshd, client_files, host_key, local_connection, run_sshd

from pytest_devbox.errors import SSHError
from pytest_devbox.transport.ssh import MAX_CHANNELS, Connection

needs_sshd = pytest.mark.skipif(not HAVE_SSHD, reason="needs OpenSSH server and ssh-keygen")


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return client_files(tmp_path_factory.mktemp("client"))


@pytest.fixture(scope="module")
def sshd_4(client: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """An sshd that keeps at most 4 sessions per connection: fewer than MAX_CHANNELS."""
    work = tmp_path_factory.mktemp("sshd4")
    with run_sshd(work, client[1], host_key(work / "hk"), max_sessions=4) as server:
        yield server


def _connect(sshd: Sshd, client: tuple[Path, Path], tmp: Path, **kw: float) -> Connection:
    conn = local_connection(sshd.port, client[0], tmp / "known_hosts", "load", **kw)
    conn.connect(timeout=10)
    return conn


def _hammer(run: object, threads: int, commands: int) -> tuple[dict[str, str], list[str]]:
    """Run ``commands`` echoes from each of ``threads`` threads; (outputs, errors)."""
    outputs: dict[str, str] = {}
    errors: list[str] = []
    start = threading.Barrier(threads)

    def worker(t: int) -> None:
        start.wait()
        for i in range(commands):
            token = f"t{t}-c{i}"
            try:
                outputs[token] = run(f"echo {token}").stdout  # type: ignore[operator]
            except Exception as e:
                errors.append(f"{token}: {e!r}")

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    return outputs, errors


def _expected(threads: int, commands: int) -> dict[str, str]:
    return {f"t{t}-c{i}": f"t{t}-c{i}\n" for t in range(threads) for i in range(commands)}


@needs_sshd
def test_sixteen_threads_beyond_max_sessions_all_succeed(
    sshd_4: Sshd, client: tuple[Path, Path], tmp_path: Path
) -> None:
    conn = _connect(sshd_4, client, tmp_path)
    transport = conn._transport
    outputs, errors = _hammer(lambda c: conn.run(c, cwd=None), 16, 10)
    assert errors == []
    assert outputs == _expected(16, 10)
    # The server did refuse channels (8 in flight, 4 allowed), and that was waited out...
    assert conn.refused_opens > 0
    assert "no more sessions" in sshd_4.log.read_text()
    # ... on the same transport: a refusal is not a lost connection.
    assert conn._transport is transport and conn.connected
    conn.close()


@needs_sshd
def test_refused_open_waits_and_keeps_the_transport(
    client: tuple[Path, Path], tmp_path: Path
) -> None:
    with run_sshd(tmp_path / "s", client[1], host_key(tmp_path / "hk"), max_sessions=1) as sshd:
        conn = _connect(sshd, client, tmp_path)
        transport = conn._transport
        first: list[str] = []
        holder = threading.Thread(
            target=lambda: first.append(conn.run("sleep 1; echo first", cwd=None).stdout)
        )
        holder.start()
        time.sleep(0.3)  # the holder has the server's only session now
        assert conn.run("echo second", cwd=None).stdout == "second\n"
        holder.join()
        assert first == ["first\n"]  # the refusal did not take the other command down
        assert conn.refused_opens >= 1
        assert conn._transport is transport and transport is not None and transport.is_active()
        conn.close()


@needs_sshd
def test_refusal_that_outlasts_channel_wait_is_a_clear_error(
    client: tuple[Path, Path], tmp_path: Path
) -> None:
    with run_sshd(tmp_path / "s", client[1], host_key(tmp_path / "hk"), max_sessions=1) as sshd:
        conn = _connect(sshd, client, tmp_path, channel_wait=1.0)
        holder = threading.Thread(target=lambda: conn.run("sleep 3", cwd=None))
        holder.start()
        time.sleep(0.3)
        with pytest.raises(SSHError, match="refused to open a session for 1 s") as info:
            conn.run("true", cwd=None)
        assert "MaxSessions" in str(info.value)
        holder.join()
        assert conn.connected  # still usable
        assert conn.run("echo ok", cwd=None).stdout == "ok\n"
        conn.close()


@needs_sshd
def test_max_channels_bounds_commands_in_flight(
    sshd_4: Sshd, client: tuple[Path, Path], tmp_path: Path
) -> None:
    conn = _connect(sshd_4, client, tmp_path, max_channels=2)
    start = time.monotonic()
    _, errors = _hammer(lambda c: conn.run(f"sleep 0.5; {c}", cwd=None), 6, 1)
    elapsed = time.monotonic() - start
    assert errors == []
    assert elapsed >= 1.45  # 6 commands of 0.5 s, 2 at a time
    assert conn.refused_opens == 0  # 2 in flight never reach the server's 4
    conn.close()


@needs_sshd
def test_put_and_get_share_the_channel_limit(
    sshd_4: Sshd, client: tuple[Path, Path], tmp_path: Path
) -> None:
    conn = _connect(sshd_4, client, tmp_path)
    remote = tmp_path / "remote"
    remote.mkdir()
    errors: list[str] = []

    def copy(n: int) -> None:
        payload = os.urandom(200_000 + n)
        src, back = tmp_path / f"src{n}", tmp_path / f"back{n}"
        src.write_bytes(payload)
        try:
            conn.put(src, str(remote / f"f{n}"))
            assert conn.run(f"wc -c < {remote / f'f{n}'}", cwd=None).stdout.strip() == str(
                len(payload)
            )
            conn.get(str(remote / f"f{n}"), back)
            assert back.read_bytes() == payload
        except Exception as e:
            errors.append(f"{n}: {e!r}")

    threads = [threading.Thread(target=copy, args=(n,)) for n in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    conn.close()


@needs_sshd
def test_threads_after_a_drop_reconnect_once(
    sshd_4: Sshd, client: tuple[Path, Path], tmp_path: Path
) -> None:
    conn = _connect(sshd_4, client, tmp_path)
    assert conn._transport is not None
    conn._transport.close()  # the connection dropped between two commands
    logins = sshd_4.log.read_text().count("Accepted publickey")
    outputs, errors = _hammer(lambda c: conn.run(c, cwd=None), 8, 2)
    assert errors == [] and outputs == _expected(8, 2)
    time.sleep(0.2)  # sshd writes its log line after the login
    assert sshd_4.log.read_text().count("Accepted publickey") == logins + 1
    conn.close()


@needs_sshd
def test_a_lost_connection_says_what_was_seen(
    sshd_4: Sshd, client: tuple[Path, Path], tmp_path: Path
) -> None:
    conn = _connect(sshd_4, client, tmp_path)
    assert conn._transport is not None
    threading.Timer(0.5, conn._transport.close).start()
    with pytest.raises(SSHError) as info:
        conn.run("sleep 100.4747", cwd=None, timeout=20)
    message = str(info.value)
    assert "dropped while running `sleep 100.4747`: transport closed" in message
    assert "may have crashed" not in message  # what was seen, not a guess
    conn.run("pkill -f 'sleep 100[.]4747'", check=False, cwd=None)
    conn.close()


GUEST_LOAD = """
import threading
import pytest

@pytest.mark.parametrize("threads", [8, 16])
def test_threads(devbox, threads):
    outputs, errors = {}, []
    start = threading.Barrier(threads)

    def worker(t):
        start.wait()
        for i in range(25):
            token = f"t{t}-c{i}"
            try:
                outputs[token] = devbox.run(f"echo {token}").stdout
            except Exception as e:
                errors.append(f"{token}: {e!r}")

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    print(f"LOAD threads={threads} x 25 commands: {len(outputs)} results")
    assert errors == []
    assert outputs == {f"t{t}-c{i}": f"t{t}-c{i}\\n" for t in range(threads) for i in range(25)}
    assert devbox.run("echo still here").stdout == "still here\\n"
"""


@pytest.mark.vm
def test_guest_serves_8_and_16_threads_on_one_connection(tmp_path: Path) -> None:
    (tmp_path / "test_load.py").write_text(GUEST_LOAD)
    r = subprocess.run(
        pytest_on_debian12("-s", "-q", "test_load.py"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    print("\n".join(line for line in r.stdout.splitlines() if "LOAD " in line))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 passed" in r.stdout
    assert MAX_CHANNELS < 10  # below the guest sshd's default MaxSessions

"""The client key pair and the pinned host keys (transport/keys.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import paramiko
import pytest

from pytest_devbox.errors import HostKeyMismatch, SSHError
from pytest_devbox.transport.keys import (
    check_host_key,
    ensure_keypair,
    pin_host_key,
    pinned_keys,
    public_key_line,
)


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen")
def test_keypair_modes_and_reuse(tmp_path: Path) -> None:
    key_dir = tmp_path / "cache" / "ssh"
    private = ensure_keypair(key_dir)
    assert private == key_dir / "id_ed25519"
    assert key_dir.stat().st_mode & 0o777 == 0o700
    assert private.stat().st_mode & 0o777 == 0o600
    line = public_key_line(private)
    assert line.startswith("ssh-ed25519 AAAA") and line.endswith(" pytest-devbox")
    assert (key_dir / "id_ed25519.pub").read_text() == line + "\n"
    # The real ssh-keygen agrees on the public half.
    derived = subprocess.run(
        ["ssh-keygen", "-y", "-f", str(private)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert derived[:2] == line.split()[:2]
    before = private.read_bytes()
    assert ensure_keypair(key_dir) == private
    assert private.read_bytes() == before


def test_world_readable_key_is_refused(tmp_path: Path) -> None:
    private = ensure_keypair(tmp_path / "k")
    private.chmod(0o644)
    with pytest.raises(SSHError, match="chmod 600"):
        ensure_keypair(tmp_path / "k")


@pytest.mark.parametrize("mode", [0o777, 0o755, 0o750, 0o711], ids=oct)
def test_key_dir_not_0700_is_refused(tmp_path: Path, mode: int) -> None:
    # The README promises 0600 keys in a 0700 directory: 0755 used to be accepted.
    ensure_keypair(tmp_path / "k")
    (tmp_path / "k").chmod(mode)
    with pytest.raises(SSHError, match=f"mode {mode:04o}.*chmod 700"):
        ensure_keypair(tmp_path / "k")
    (tmp_path / "k").chmod(0o700)
    assert ensure_keypair(tmp_path / "k") == tmp_path / "k" / "id_ed25519"


def test_concurrent_keypair_creation_agrees(tmp_path: Path) -> None:
    results: list[str] = []

    def make() -> None:
        results.append(public_key_line(ensure_keypair(tmp_path / "race")))

    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and len(set(results)) == 1
    assert (tmp_path / "race" / "id_ed25519.pub").read_text() == results[0] + "\n"


# --- known_hosts pinning (defect 6 of issue 8) --------------------------------------------


def _host_key(directory: Path) -> paramiko.PKey:
    return paramiko.Ed25519Key(filename=str(ensure_keypair(directory)))


def test_pin_then_check_then_mismatch(tmp_path: Path) -> None:
    known_hosts = tmp_path / "ssh" / "known_hosts"
    key, other = _host_key(tmp_path / "a"), _host_key(tmp_path / "b")
    check_host_key(known_hosts, "debian-12-abc", key, "127.0.0.1:2222")  # pins
    assert known_hosts.read_text().split() == ["debian-12-abc", "ssh-ed25519", key.get_base64()]
    check_host_key(known_hosts, "debian-12-abc", key, "127.0.0.1:2223")  # same key: fine
    with pytest.raises(HostKeyMismatch, match="ssh-keygen -R debian-12-abc -f"):
        check_host_key(known_hosts, "debian-12-abc", other, "127.0.0.1:2224")
    # A pin that lands between our read and our write wins; we are told, not overwritten.
    with pytest.raises(HostKeyMismatch):
        pin_host_key(known_hosts, "debian-12-abc", other, "127.0.0.1:2224")
    assert pinned_keys(known_hosts, "debian-12-abc")["ssh-ed25519"].asbytes() == key.asbytes()


def test_unreadable_known_hosts_is_a_clear_error(tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.mkdir()  # a directory where the file should be
    with pytest.raises(SSHError, match="delete that file"):
        pinned_keys(known_hosts, "x")


def test_concurrent_pins_from_threads_keep_every_alias(tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"
    key = _host_key(tmp_path / "k")
    aliases = [f"img-{i}" for i in range(32)]
    start = threading.Barrier(len(aliases))
    errors: list[BaseException] = []

    def pin(alias: str) -> None:
        start.wait()
        try:
            check_host_key(known_hosts, alias, key, "127.0.0.1:22")
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=pin, args=(a,)) for a in aliases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(line.split()[0] for line in known_hosts.read_text().splitlines()) == sorted(
        aliases
    )


PINNER = """
import os, sys, time
from pathlib import Path
import paramiko
from pytest_devbox.transport.keys import check_host_key
known_hosts, key_file, go, worker = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4]
key = paramiko.Ed25519Key(filename=key_file)
Path(f"{go}.ready-{worker}").touch()
while not go.exists():
    time.sleep(0.005)
for i in range(8):
    check_host_key(known_hosts, f"w{worker}-{i}", key, "127.0.0.1:22")
"""


def test_concurrent_pins_from_processes_keep_every_alias(tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"
    key_file = ensure_keypair(tmp_path / "k")
    go = tmp_path / "go"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", PINNER, str(known_hosts), str(key_file), str(go), str(w)]
        )
        for w in range(6)
    ]
    # Start them together once each has imported paramiko (a fixed sleep is too short on
    # a busy machine: the workers would then run one after the other and prove nothing).
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("go.ready-*"))) < len(workers):
        assert time.monotonic() < deadline, "the workers never got ready"
        assert all(w.poll() is None for w in workers), "a worker died before the start"
        time.sleep(0.05)
    go.touch()
    assert [w.wait(60) for w in workers] == [0] * 6
    pinned = {line.split()[0] for line in known_hosts.read_text().splitlines()}
    assert pinned == {f"w{w}-{i}" for w in range(6) for i in range(8)}

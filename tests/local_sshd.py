"""A real OpenSSH server on 127.0.0.1 for the SSH tests and benchmarks."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_devbox.transport.ssh import Connection, probe_banner

SSHD = "/usr/sbin/sshd"
HAVE_SSHD = os.path.exists(SSHD) and shutil.which("ssh-keygen") is not None


@dataclass
class Sshd:
    port: int
    host_key: Path
    process: subprocess.Popen[bytes]
    log: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def host_key(path: Path) -> Path:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return path


def username() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


@contextlib.contextmanager
def run_sshd(
    workdir: Path, authorized_keys: Path, host_key: Path, *, max_sessions: int = 50
) -> Iterator[Sshd]:
    """Start sshd in the foreground on a free loopback port; stop it afterwards.

    ``max_sessions`` is sshd's MaxSessions: channels it keeps open at once per
    connection (OpenSSH's default is 10; a guest image's sshd may use that default).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
    root_login = "PermitRootLogin prohibit-password" if os.geteuid() == 0 else ""
    for _attempt in range(3):  # another process may grab the port between probe and bind
        port = free_port()
        config = workdir / "sshd_config"
        config.write_text(
            f"""
Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
AuthorizedKeysFile {authorized_keys}
{root_login}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile {workdir / "sshd.pid"}
Subsystem sftp internal-sftp
MaxSessions {max_sessions}
LogLevel INFO
"""
        )
        log = workdir / "sshd.log"
        proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=log.open("wb"),
        )
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            if probe_banner("127.0.0.1", port, 1):
                break
            time.sleep(0.05)
        else:
            proc.kill()
            proc.wait()
            continue
        try:
            yield Sshd(port, host_key, proc, log)
        finally:
            proc.terminate()
            proc.wait(10)
        return
    raise RuntimeError(f"sshd did not start; see {log}:\n{log.read_text()}")


def client_files(directory: Path) -> tuple[Path, Path]:
    """A client key pair under ``directory`` and an authorized_keys file that admits it."""
    from pytest_devbox.transport.keys import ensure_keypair, public_key_line

    key = ensure_keypair(directory / "keys")
    authorized = directory / "authorized_keys"
    authorized.write_text(public_key_line(key) + "\n")
    return key, authorized


def local_connection(port: int, key: Path, known_hosts: Path, alias: str, **kw: Any) -> Connection:
    """A connection (not yet open) as this user to a local sshd run by `run_sshd`."""
    return Connection(
        "127.0.0.1",
        port,
        username=username(),
        key_path=key,
        known_hosts=known_hosts,
        host_key_alias=alias,
        **kw,
    )

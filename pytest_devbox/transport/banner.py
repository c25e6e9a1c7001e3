"""Whether an SSH server greets: the readiness probe of a guest's forwarded port.

A forwarded port accepts connections before the guest's sshd runs (QEMU's user network
answers for it), so an open port alone proves nothing; the banner ("SSH-...") does.
"""

from __future__ import annotations

import socket
import time
from typing import Any


def read_banner(sock: Any, timeout: float) -> bool:
    """True if ``sock`` (a socket, or a paramiko channel) starts with "SSH-" within
    ``timeout`` seconds; False on end of file, a timeout or an error."""
    deadline = time.monotonic() + timeout
    data = b""
    try:
        while len(data) < 4:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            sock.settimeout(remaining)
            chunk = sock.recv(256)
            if not chunk:
                return False
            data += chunk
    except (OSError, EOFError):  # socket.timeout is an OSError
        return False
    return data.startswith(b"SSH-")


def probe_banner(host: str, port: int, timeout: float) -> bool:
    """True if an SSH server greets on ``host:port`` within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            return read_banner(sock, timeout)
    except OSError:
        return False

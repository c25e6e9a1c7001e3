"""Tests across guests: a TCP echo server on one distro, a client on another, talking
over a private network of their own.

    pytest examples --devbox=debian-11,debian-12 -v

Both roles are "*": the test runs once per server x client pair of the selected distros
(four here). Each pair is two fresh guests; `.address` is a guest's address on the
private network, and each guest resolves the other's role name.
"""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pytest_devbox import Machine

PORT = 7777
ECHO_SERVER = f"""
import socket
with socket.create_server(("0.0.0.0", {PORT})) as srv:
    while True:
        conn, _ = srv.accept()
        with conn:
            conn.sendall(conn.recv(1024).upper())
"""
ECHO_CLIENT = f"""
import socket, sys
with socket.create_connection((sys.argv[1], {PORT}), timeout=10) as c:
    c.sendall(sys.argv[2].encode())
    print(c.recv(1024).decode())
"""


def start_echo_server(server: Machine) -> None:
    server.run(
        f"nohup python3 -c {shlex.quote(ECHO_SERVER)} >/tmp/echo.log 2>&1 & "
        # Ready once it listens: ss is in iproute2, which every template has.
        f"for i in $(seq 50); do ss -ltn | grep -q ':{PORT} ' && exit 0; sleep 0.2; done; "
        "cat /tmp/echo.log; exit 1"
    )


def echo(client: Machine, host: str, text: str) -> str:
    return client.run(f"python3 -c {shlex.quote(ECHO_CLIENT)} {host} {text}").stdout.strip()


@pytest.mark.devbox_topology(server="*", client="*")
def test_echo_across_guests(devbox_topology: dict[str, Machine]) -> None:
    server, client = devbox_topology["server"], devbox_topology["client"]
    start_echo_server(server)
    print(f"{client.distro} -> {server.distro} at {server.address}")
    assert echo(client, server.address or "", "by-address") == "BY-ADDRESS"
    assert echo(client, "server", "by-name") == "BY-NAME"

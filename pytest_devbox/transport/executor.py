"""The resident executor, host side: one long-lived SSH channel per login runs
transport/executor_guest.py, and every command of that login is multiplexed over it.

A command over its own exec channel pays for sshd's session set-up (PAM, a logind
session, the login shell) every time; through the executor it pays for one fork and
``sh -c``. Frames both ways are a 9-byte header (call id, kind, payload length) and
the payload; a reader thread sorts the guest's frames into the calls waiting for them,
so several threads may run commands at once. When the channel ends, every waiting call
fails with an SSHError that says so, and the login starts a new executor next time.
"""

from __future__ import annotations

import json
import shlex
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import paramiko

from ..errors import SSHError
from ..result import Result, shorten
from . import executor_guest as wire
from .exec_channel import OUTPUT_LIMIT, Capped, no_nul
from .ssh import TRANSPORT_ERRORS, Connection

__all__ = ["NO_PYTHON", "Executor", "ExecutorLost"]

# The guest interpreters tried, in order: CentOS 8 has only platform-python.
PYTHONS = ("python3", "/usr/libexec/platform-python")
NO_PYTHON = "devbox-executor: no python3"
START_TIMEOUT = 60.0
"""Seconds the executor may take to greet (Python's start-up under emulation)."""
STOP_WAIT = 10.0
"""Seconds a stopped command's last output and exit may take to arrive."""
_SEND_CHUNK = 32768


class ExecutorLost(SSHError):
    """The executor's channel ended while a command ran (executor killed, connection
    dropped); the next command starts a new executor."""


def _guest_source() -> str:
    return Path(wire.__file__).read_text(encoding="utf-8")


def boot_line(pythons: Sequence[str] = PYTHONS) -> str:
    """The shell line that replaces the login shell with the executor (the first of
    ``pythons`` there is), or says there is none."""
    src = shlex.quote(_guest_source())
    tries = "; ".join(
        f'command -v {p} >/dev/null 2>&1 && exec {p} -I -S -c "$src"' for p in pythons
    )
    return f"src={src}; {tries}; echo '{NO_PYTHON}'; exit 127"


class _Call:
    """One command in flight: what the guest sent back for it so far."""

    def __init__(self, limit: int | None) -> None:
        self.out = Capped(limit)
        self.err = Capped(limit)
        self.status: int | None = None
        self.lost = False
        self.done = threading.Event()


class Executor:
    """One running executor on one channel of ``conn``. Create with :meth:`start`."""

    def __init__(self, conn: Connection, channel: paramiko.Channel, hello: bytes) -> None:
        self.where = f"{conn.username}@{conn.host}:{conn.port}"
        fields = hello[len(wire.HELLO) :].decode().split()
        self.pid = int(fields[0])
        """The executor's pid in the guest."""
        self.python = fields[1]
        self.dead: str | None = None
        """Why the executor ended; None while it runs."""
        self._channel = channel
        self._calls: dict[int, _Call] = {}
        self._next = 1
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._reader = threading.Thread(
            target=self._read, name=f"devbox-executor {self.where}", daemon=True
        )

    @classmethod
    def start(
        cls, conn: Connection, pythons: Sequence[str] = PYTHONS, timeout: float = START_TIMEOUT
    ) -> Executor | str:
        """Start an executor on a new channel of ``conn``; or, where none can run, why not."""
        channel = conn.open_session()
        try:
            channel.exec_command(boot_line(pythons))
            channel.settimeout(timeout)
            buf = bytearray()
            while len(buf) < wire.HEADER.size or len(buf) < wire.HEADER.size + _size(buf):
                data = channel.recv(wire.CHUNK)
                if not data:
                    break
                buf += data
        except TRANSPORT_ERRORS as e:
            channel.close()
            if isinstance(e, socket.timeout):
                return f"the executor did not start within {timeout:g} s"
            raise SSHError(f"cannot start the devbox executor on {conn.host}: {e!r}") from e
        size = _size(buf) if len(buf) >= wire.HEADER.size else -1
        hello = bytes(buf[wire.HEADER.size : wire.HEADER.size + size])
        if size < 0 or not hello.startswith(wire.HELLO):
            channel.close()
            said = bytes(buf).decode("utf-8", "replace").strip() or _stderr(channel)
            return "no python3 or platform-python" if NO_PYTHON in said else shorten(said, 300)
        channel.settimeout(None)
        executor = cls(conn, channel, hello)
        executor._reader.start()
        return executor

    # -- running --

    def run(
        self,
        command: str,
        argv: list[str],
        stdin: bytes | None,
        timeout: float | None,
        user: str | None = None,
        output_limit: int | None = OUTPUT_LIMIT,
    ) -> tuple[Result, bool]:
        """Run ``argv`` in the guest; its :class:`Result` and whether ``timeout`` expired.

        ``user``: a root executor switches to that user itself, with the environment
        ``sudo -H`` gives (far cheaper than a sudo per command).

        On a timeout or Ctrl-C the command's process group is stopped first (SIGTERM,
        SIGKILL a second later). Raises :class:`ExecutorLost` if the executor ends.
        Each stream keeps ``output_limit`` bytes at most (exec_channel.Capped).
        """
        no_nul(f"`{shorten(command, 200)}`", *argv, user or "")  # before a byte is sent
        start = time.monotonic()
        call = _Call(output_limit)
        with self._lock:
            if self.dead is not None:
                raise self._lost(command, call)
            call_id = self._next
            self._next += 1
            self._calls[call_id] = call
        self._send(
            call_id,
            wire.START,
            json.dumps({"argv": argv, "stdin": bool(stdin), "user": user}).encode(),
        )
        if stdin:
            view = memoryview(stdin)
            for i in range(0, len(view), _SEND_CHUNK):
                self._send(call_id, wire.STDIN, bytes(view[i : i + _SEND_CHUNK]))
            self._send(call_id, wire.STDIN, b"")
        timed_out = False
        try:
            if not call.done.wait(timeout):
                timed_out = True
                self._send(call_id, wire.STOP)
                if not call.done.wait(STOP_WAIT):  # something holds its output open
                    with self._lock:
                        self._calls.pop(call_id, None)
        except KeyboardInterrupt:
            self._send(call_id, wire.STOP)
            raise
        if call.lost and not timed_out:
            raise self._lost(command, call)
        result = Result(
            command=command,
            exit_status=None if timed_out else call.status,
            stdout=call.out.text(),
            stderr=call.err.text(),
            duration=time.monotonic() - start,
        )
        return result, timed_out

    def _send(self, call_id: int, kind: int, payload: bytes = b"") -> None:
        frame = wire.HEADER.pack(call_id, kind, len(payload)) + payload
        with self._send_lock:
            try:
                self._channel.sendall(frame)
            except TRANSPORT_ERRORS as e:
                self._die(f"sending to it failed ({e!r})")
            except BaseException as e:
                # Ctrl-C, pytest-timeout's SIGALRM: part of the frame may be on the wire,
                # and the guest would read the rest of the stream as headers. This
                # executor is done; the next command starts a new one.
                self._die(f"a frame to it was cut short ({e!r})")
                self._channel.close()
                raise

    def _lost(self, command: str, call: _Call) -> ExecutorLost:
        out = Result(command, None, call.out.text(), "", 0).tails(5)
        return ExecutorLost(
            f"the devbox executor of {self.where} (guest pid {self.pid}) ended while running "
            f"`{shorten(command, 200)}`: {self.dead}; the command's fate is unknown, and "
            f"the next command starts a new executor\n{out}"
        )

    def close(self) -> None:
        """Close the channel: the guest side stops its commands and exits."""
        self._die("the login was closed")  # first: the reader would see only an EOF
        self._channel.close()

    # -- the reader thread --

    def _read(self) -> None:
        buf = bytearray()
        reason = "its channel ended"
        try:
            while True:
                data = self._channel.recv(wire.CHUNK)
                if not data:
                    break
                buf += data
                self._dispatch(buf)
        except TRANSPORT_ERRORS as e:
            reason = f"its connection failed ({e!r})"
        self._die(self._why(reason))

    def _dispatch(self, buf: bytearray) -> None:
        header = wire.HEADER.size
        while len(buf) >= header and len(buf) >= header + _size(buf):
            call_id, kind, size = wire.HEADER.unpack_from(buf)
            payload = bytes(buf[header : header + size])
            del buf[: header + size]
            with self._lock:
                call = self._calls.get(call_id)
            if call is None:
                continue
            if kind == wire.OUT:
                call.out.add(payload)
            elif kind == wire.ERR:
                call.err.add(payload)
            elif kind == wire.EXIT:
                call.status = json.loads(payload)["status"]
                with self._lock:
                    del self._calls[call_id]
                call.done.set()

    def _why(self, reason: str) -> str:
        """``reason`` with what the channel tells of the executor's end."""
        channel = self._channel
        if channel.status_event.wait(1.0):  # sshd sends the status right after the end
            status = channel.recv_exit_status()
            reason += " (killed by a signal)" if status == -1 else f" (exit status {status})"
        err = _stderr(channel)
        return f"{reason}; it said: {shorten(err, 500)}" if err else reason

    def _die(self, reason: str) -> None:
        with self._lock:
            if self.dead is None:
                self.dead = reason
            calls = list(self._calls.values())
            self._calls.clear()
        for call in calls:
            call.lost = True
            call.done.set()


def _size(buf: bytearray) -> int:
    size: int = wire.HEADER.unpack_from(buf)[2]
    return size


def _stderr(channel: paramiko.Channel) -> str:
    err = b""
    while channel.recv_stderr_ready():
        err += channel.recv_stderr(wire.CHUNK)
    return err.decode("utf-8", "replace").strip()

"""One command on one SSH exec channel, whatever connection the channel belongs to.

Every command runs under ``sh -c`` so its semantics are the same on every distro. The
login shell first prints its pid (sshd made it a session and process-group leader) and
then ``exec``s the wrapper, so a timed-out command can be stopped by signalling that
whole process group from a second channel: closing an exec channel alone leaves a
pty-less remote command running. ssh.Connection opens the channels.
"""

from __future__ import annotations

import dataclasses
import re
import select
import shlex
import time
from collections.abc import Callable, Mapping

import paramiko

from ..result import Result

__all__ = [
    "OUTPUT_LIMIT",
    "Capped",
    "execute",
    "for_history",
    "no_nul",
    "shell_argv",
    "stop_script",
    "wire_command",
]

OUTPUT_LIMIT = 64 * 1024 * 1024
"""Bytes of each output stream a command's Result keeps by default (head and tail)."""
_CHUNK = 65536
_HEADER_MAX = 4096  # a first line longer than this is no pid header
HISTORY_KEEP = 256 * 1024
"""Characters of each stream a login's history keeps of a Result (the tails it shows)."""
_PID_MARKER = b"devbox-pid:"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def execute(
    channel: paramiko.Channel,
    command: str,
    wire: str,
    stdin: bytes | None,
    timeout: float | None,
    stop: Callable[[int | None], None],
    output_limit: int | None = OUTPUT_LIMIT,
) -> tuple[Result, bool]:
    """Run ``wire`` on ``channel``; the :class:`Result` and whether ``timeout`` expired.

    ``stop(pgid)`` is called with the remote process group (None if not yet known)
    when the deadline passes or on Ctrl-C, before the rest of the output is taken.
    Each stream keeps ``output_limit`` bytes at most (None: all), see :class:`Capped`.
    """
    start = time.monotonic()
    deadline = None if timeout is None else start + timeout
    output = Output(output_limit)
    channel.exec_command(wire)
    if not stdin:
        channel.shutdown_write()
    try:
        timed_out = _pump(channel, output, stdin or None, deadline)
    except KeyboardInterrupt:
        stop(output.pgid)
        raise
    status: int | None = None
    if timed_out:
        stop(output.pgid)
        output.drain(channel)
    else:
        raw = channel.recv_exit_status()  # paramiko's -1: closed without a status
        status = None if raw == -1 else raw
    result = Result(
        command=command,
        exit_status=status,
        stdout=output.stdout(),
        stderr=output.err.text(),
        duration=time.monotonic() - start,
    )
    return result, timed_out


def stop_script(pgid: int) -> str:
    """Shell code that stops process group ``pgid``: SIGTERM, then SIGKILL after 1 s."""
    g = f"-{pgid}"
    return (
        f"kill -TERM {g} 2>/dev/null || exit 0; i=0; "
        f'while [ "$i" -lt 10 ] && kill -0 {g} 2>/dev/null; do sleep 0.1; i=$((i+1)); done; '
        f"kill -KILL {g} 2>/dev/null; exit 0"
    )


class Capped:
    """One output stream as kept: its first and last ``limit / 2`` bytes, and how many
    were dropped between (a `dd` to stdout must not exhaust the pytest process)."""

    def __init__(self, limit: int | None = OUTPUT_LIMIT) -> None:
        self.limit = limit
        self.head = bytearray()
        self.tail = bytearray()
        self.dropped = 0

    def add(self, data: bytes) -> None:
        if self.limit is None:
            self.head += data
            return
        room = max(0, self.limit // 2 - len(self.head))
        self.head += data[:room]
        self.tail += data[room:]
        excess = len(self.tail) - (self.limit - self.limit // 2)
        if excess > 0:
            del self.tail[:excess]
            self.dropped += excess

    def text(self) -> str:
        """The stream decoded (bad UTF-8 replaced), a marker where bytes were dropped."""
        head = self.head.decode("utf-8", errors="replace")
        if not self.dropped and not self.tail:
            return head
        marker = f"\n... {self.dropped} bytes dropped ...\n" if self.dropped else ""
        return head + marker + self.tail.decode("utf-8", errors="replace")


def for_history(result: Result) -> Result:
    """``result`` as a login's history keeps it: itself, or when its output is long, a
    copy with the last ``HISTORY_KEEP`` characters of each stream (20 of them are kept,
    for the tails a failure report shows)."""
    streams = (result.stdout, result.stderr)
    if all(len(text) <= HISTORY_KEEP for text in streams):
        return result
    out, err = (
        text
        if len(text) <= HISTORY_KEEP
        else f"... (cut for the history) ...\n{text[-HISTORY_KEEP:]}"
        for text in streams
    )
    return dataclasses.replace(result, stdout=out, stderr=err)


class Output:
    """A command's output so far, and the remote pid its first line announced."""

    def __init__(self, limit: int | None = OUTPUT_LIMIT) -> None:
        self.out = Capped(limit)
        self.err = Capped(limit)
        self._first = bytearray()  # stdout until the pid line is complete
        self.pgid: int | None = None
        self.header_done = False

    def drain(self, channel: paramiko.Channel) -> None:
        """Take whatever both streams hold now; strip the pid line once it is complete."""
        while channel.recv_ready():
            self._take(channel.recv(_CHUNK))
        while channel.recv_stderr_ready():
            self.err.add(channel.recv_stderr(_CHUNK))

    def _take(self, data: bytes) -> None:
        if self.header_done:
            self.out.add(data)
            return
        self._first += data
        self.header_done, self.pgid = strip_pid_header(self._first)
        if self.header_done or len(self._first) > _HEADER_MAX:
            self.header_done = True
            self.out.add(bytes(self._first))
            self._first.clear()

    def stdout(self) -> str:
        """What the command wrote on stdout, without the pid line."""
        if self._first:  # never completed: it ended before a newline
            self.out.add(bytes(self._first))
            self._first.clear()
        return self.out.text()


def _pump(
    channel: paramiko.Channel, output: Output, stdin: bytes | None, deadline: float | None
) -> bool:
    """Feed stdin and collect output until the command ends; True if ``deadline`` passed."""
    pending = memoryview(stdin) if stdin else None
    # fileno() is readable while either stream has data, and after EOF.
    fd = channel.fileno()
    while True:
        output.drain(channel)
        if pending is not None and channel.send_ready():
            sent = channel.send(bytes(pending[:_CHUNK]))
            pending = pending[sent:]
            if not pending:
                pending = None
                channel.shutdown_write()
        if channel.eof_received and not channel.recv_ready():
            if not channel.recv_stderr_ready():
                break
            continue
        if channel.closed:
            break
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            return True
        wait = 0.01 if pending is not None else 0.5
        if deadline is not None:
            wait = min(wait, deadline - now)
        select.select([fd], [], [], wait)
    # The exit status may trail the end of the output.
    remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
    return not channel.status_event.wait(remaining)


def wire_command(
    command: str,
    cwd: str | None,
    env: Mapping[str, str] | None,
    user: str | None,
) -> str:
    """The string sshd hands to the login shell for ``command``."""
    argv = shell_argv(command, cwd, env, user)
    return f"echo {_PID_MARKER.decode()}$$; exec {shlex.join(argv)}"


def shell_argv(
    command: str,
    cwd: str | None,
    env: Mapping[str, str] | None,
    user: str | None,
) -> list[str]:
    """``sh -c`` (through ``sudo -n`` for ``user``) running ``command`` in ``cwd`` with
    ``env`` exported: the same argv over SSH and through the executor.

    ValueError for a NUL byte anywhere: a C string would end there in the guest, which
    then runs a truncated command, or (the executor) cannot run it at all."""
    no_nul("the command", command, cwd or "", user or "", *(env or {}).values())
    lines = []
    for name, value in (env or {}).items():
        if not _ENV_NAME.match(name):
            raise ValueError(f"invalid environment variable name: {name!r}")
        lines.append(f"export {name}={shlex.quote(value)}")
    if cwd is not None:
        lines.append(f"cd -- {shlex.quote(cwd)} || exit 1")
    lines.append(command)
    argv = ["sh", "-c", "\n".join(lines)]
    if user is not None:
        argv = ["sudo", "-n", "-u", user, "-H", "--", *argv]
    return argv


def no_nul(what: str, *texts: str) -> None:
    """ValueError when one of ``texts`` holds a NUL byte, which no guest argv can."""
    if any("\0" in t for t in texts):
        raise ValueError(f"{what} holds a NUL byte, which no command line can carry")


def strip_pid_header(out: bytearray) -> tuple[bool, int | None]:
    """Remove the ``devbox-pid:N`` first line from ``out``; (header complete, N)."""
    end = out.find(b"\n")
    if end < 0:
        return False, None
    line = bytes(out[:end])
    if not line.startswith(_PID_MARKER):
        return True, None  # something printed before us (a noisy shell rc): leave it
    del out[: end + 1]
    try:
        return True, int(line[len(_PID_MARKER) :])
    except ValueError:
        return True, None

# devbox-executor: runs in the guest, started once per login over one SSH channel.
"""The resident executor's guest side: a small stdlib-only Python 3.6+ program.

The host imports it for its constants only: transport/executor.py sends this file's text as
``python3 -c``'s argument. It reads frames on stdin and writes frames on stdout; each
frame is a 9-byte header (call id, kind, payload length: ``>IBI``) and its payload. It
forks each command in its own session (so its own process group) and streams the
command's stdout, stderr and exit status back, several commands at once, from one
select loop. When its stdin ends (the host closed the channel or the connection
dropped) it stops every command it started and exits. A watchdog process, forked at
start, stops them too when the executor itself is killed (SIGKILL, the OOM killer).

Written for Python 3.6 (CentOS 8's platform-python): no walrus, no ``X | Y`` or
``list[int]`` at run time, no ``capture_output``.
"""

import contextlib
import json
import os
import pwd
import selectors
import signal
import struct
import subprocess
import sys
import threading
import time
import typing

HEADER = struct.Struct(">IBI")
# host -> guest
START, STDIN, STOP = 1, 2, 3
# guest -> host
READY, OUT, ERR, EXIT = 11, 12, 13, 14  # READY: the hello, once
HELLO = b"devbox-executor 1 "
CHUNK = 65536
GRACE = 1.0  # seconds between SIGTERM and SIGKILL for a stopped process group
# A warm shell, started ahead, reads its script as a line count and lines on stdin
# (dash's read takes one byte at a time: it leaves the command's stdin untouched) and
# evals it: a command then waits for no fork and exec of sh (60 ms under emulation).
WARM = """IFS= read -r __n; __s=; __i=0
while [ "$__i" -lt "$__n" ]; do IFS= read -r __l; __s="$__s$__l
"; __i=$((__i+1)); done
unset __n __i __l; eval "unset __s; ${__s%?}"
"""
WARM_MAX = 8192  # longer scripts get a fresh sh -c: a byte a read is slow
WARM_WAIT = 0.25  # seconds a command waits for the warm shell still starting


def send(call: int, kind: int, payload: bytes = b"") -> None:
    """Write one frame to stdout (blocking: the host always reads)."""
    data = memoryview(HEADER.pack(call, kind, len(payload)) + payload)
    while data:
        data = data[os.write(1, data) :]


class Command:
    """One running command: its process, pipes still open, stdin not yet written."""

    def __init__(self, call: int, proc: "subprocess.Popen[bytes]") -> None:
        self.call = call
        self.proc = proc
        self.open_pipes = 2
        self.pending = bytearray()
        self.stdin_eof = False
        self.kill_at: float | None = None


def spawn(argv: "list[str]", stdin: int, **kw: typing.Any) -> "subprocess.Popen[bytes]":
    return subprocess.Popen(
        argv,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, stopped as a whole
        **kw,
    )


class WarmShells:
    """One shell started ahead by a thread of its own. A command that finds it still
    starting waits for it (a little) rather than start a second shell beside it."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.ready: subprocess.Popen[bytes] | None = None
        self.spawning = True
        threading.Thread(target=self.keep_one, daemon=True).start()

    def keep_one(self) -> None:
        while True:
            try:
                proc = spawn(["sh", "-c", WARM], subprocess.PIPE)
            except OSError:  # no warm shells: every command gets its own sh -c
                proc = None
            with self.cond:
                self.ready, self.spawning = proc, False
                self.cond.notify_all()
                if proc is None:
                    return
                self.cond.wait_for(lambda: self.ready is None)
                self.spawning = True

    def take(self) -> "subprocess.Popen[bytes] | None":
        with self.cond:
            self.cond.wait_for(lambda: self.ready is not None or not self.spawning, WARM_WAIT)
            proc, self.ready = self.ready, None
            if proc is not None:
                self.spawning = True  # the thread starts the next one now
                self.cond.notify_all()
        return proc

    def stop(self) -> None:
        with self.cond:
            if self.ready is not None:
                signal_group(self.ready.pid, signal.SIGKILL)


class Executor:
    def __init__(self, watchdog: int = -1) -> None:
        self.sel = selectors.DefaultSelector()
        self.commands: dict[int, Command] = {}
        self.inbuf = bytearray()
        self.warm = WarmShells()
        self.watchdog = watchdog  # the pipe to start_watchdog's process (-1: none)

    def serve(self) -> None:
        self.sel.register(0, selectors.EVENT_READ, None)
        # A child's exit wakes the select loop: no polling for exit statuses.
        wake_r, wake_w = os.pipe()
        for fd in (wake_r, wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        self.sel.register(wake_r, selectors.EVENT_READ, "exits")
        version = "{}.{}".format(*sys.version_info[:2])
        send(0, READY, HELLO + f"{os.getpid()} {version}".encode())
        try:
            while self.loop_once():
                pass
        finally:
            for command in self.commands.values():
                signal_group(command.proc.pid, signal.SIGKILL)
            self.warm.stop()

    def loop_once(self) -> bool:
        """One pass: wait for input or a deadline, handle it; False when stdin ended."""
        reaping = any(c.open_pipes == 0 for c in self.commands.values())
        kills = [c.kill_at for c in self.commands.values() if c.kill_at is not None]
        timeout = 0.5 if reaping else None  # in case a wake-up was missed
        if kills:
            wait = max(0.0, min(kills) - time.monotonic())
            timeout = wait if timeout is None else min(timeout, wait)
        for key, events in self.sel.select(timeout):
            if key.data == "exits":
                with contextlib.suppress(BlockingIOError):
                    os.read(key.fd, CHUNK)
            elif key.fd == 0:
                data = os.read(0, CHUNK)
                if not data:
                    return False
                self.inbuf += data
                self.take_frames()
            elif events & selectors.EVENT_WRITE:
                self.feed(key.data)
            else:
                self.relay(key)
        self.reap()
        return True

    def take_frames(self) -> None:
        while len(self.inbuf) >= HEADER.size:
            call, kind, size = HEADER.unpack_from(self.inbuf)
            if len(self.inbuf) < HEADER.size + size:
                return
            payload = bytes(self.inbuf[HEADER.size : HEADER.size + size])
            del self.inbuf[: HEADER.size + size]
            if kind == START:
                self.start(call, json.loads(payload.decode("utf-8")))
            elif call in self.commands and kind == STDIN:
                self.stdin(self.commands[call], payload)
            elif call in self.commands and kind == STOP:
                command = self.commands[call]
                signal_group(command.proc.pid, signal.SIGTERM)
                command.kill_at = time.monotonic() + GRACE

    def start(self, call: int, spec: "dict[str, typing.Any]") -> None:
        argv = spec.get("argv") or []  # type: list[str]
        user = spec.get("user")
        warm = None
        if not user and len(argv) == 3 and argv[:2] == ["sh", "-c"]:
            warm = self.warm.take() if len(argv[2]) <= WARM_MAX else None
        try:
            if warm is not None:
                proc = warm
            elif user:
                proc = spawn(argv, subprocess.PIPE, **as_user(user))
            else:
                proc = spawn(argv, subprocess.PIPE if spec["stdin"] else subprocess.DEVNULL)
        except Exception as e:  # any: one bad command (a NUL in argv) must not end the rest
            # Like sudo or a shell that cannot run it: a message and status 1.
            why = "unknown user" if isinstance(e, KeyError) and user else str(e) or repr(e)
            who = f" as {user}" if user else ""
            send(call, ERR, f"devbox executor: cannot run it{who}: {why}\n".encode())
            send(call, EXIT, b'{"status": 1}')
            return
        self.watch(proc.pid, True)
        command = Command(call, proc)
        self.commands[call] = command
        for stream, kind in ((proc.stdout, OUT), (proc.stderr, ERR)):
            assert stream is not None
            self.sel.register(stream, selectors.EVENT_READ, (command, kind))
        if proc.stdin is not None:
            os.set_blocking(proc.stdin.fileno(), False)
        if warm is not None:
            script = argv[2]
            self.stdin(command, f"{script.count(chr(10)) + 1}\n{script}\n".encode())
        if not spec["stdin"]:
            self.stdin(command, b"")

    def stdin(self, command: Command, data: bytes) -> None:
        stream = command.proc.stdin
        if stream is None or command.stdin_eof:
            return
        if not data:
            command.stdin_eof = True
        command.pending += data
        self.feed(command)

    def feed(self, command: Command) -> None:
        """Write what the command's stdin can take now; watch it while more is pending."""
        stream = command.proc.stdin
        assert stream is not None
        if stream.closed:
            # A write event of this select() batch for a stream that an earlier event of
            # the same batch (its stdin's end) fed and closed: nothing is left to do.
            return
        try:
            while command.pending:
                del command.pending[: os.write(stream.fileno(), command.pending[:CHUNK])]
        except BlockingIOError:
            pass
        except OSError:  # the command stopped reading (EPIPE): drop the rest
            command.pending = bytearray()
            command.stdin_eof = True
        watched = self.is_watched(stream)
        if command.pending and not watched:
            self.sel.register(stream, selectors.EVENT_WRITE, command)
        elif not command.pending and watched:
            self.sel.unregister(stream)
        if not command.pending and command.stdin_eof and not stream.closed:
            stream.close()

    def is_watched(self, stream: typing.Any) -> bool:
        try:
            self.sel.get_key(stream)
            return True
        except KeyError:
            return False

    def relay(self, key: "selectors.SelectorKey") -> None:
        command, kind = key.data
        data = os.read(key.fd, CHUNK)
        if data:
            send(command.call, kind, data)
            return
        self.sel.unregister(key.fileobj)
        key.fileobj.close()  # type: ignore[union-attr]
        command.open_pipes -= 1

    def watch(self, pgid: int, running: bool) -> None:
        """Tell the watchdog of a command's process group started or reaped."""
        if self.watchdog < 0:
            return
        try:
            os.write(self.watchdog, f"{'+' if running else '-'}{pgid}\n".encode())
        except OSError:  # it died: commands still run, unguarded
            self.watchdog = -1

    def reap(self) -> None:
        now = time.monotonic()
        for call, command in list(self.commands.items()):
            if command.kill_at is not None and now >= command.kill_at:
                signal_group(command.proc.pid, signal.SIGKILL)
                command.kill_at = None
            if command.open_pipes or command.proc.poll() is None:
                continue
            del self.commands[call]
            self.watch(command.proc.pid, False)
            stream = command.proc.stdin
            if stream is not None and not stream.closed:
                if self.is_watched(stream):
                    self.sel.unregister(stream)
                stream.close()
            code = command.proc.returncode
            # Like sshd: killed by a signal has no exit status.
            status = {"status": code if code >= 0 else None, "signal": -code if code < 0 else None}
            send(call, EXIT, json.dumps(status).encode())


def as_user(name: str) -> "dict[str, typing.Any]":
    """Popen's arguments for ``sudo -n -u NAME -H`` (run as root): the user's HOME,
    USER, LOGNAME and SHELL, our PATH, locale and TERM (nothing else); its uid, gid and
    groups, looked up here (NSS calls in a child forked beside a thread can deadlock)."""
    entry = pwd.getpwnam(name)
    keep = ("PATH", "LANG", "LANGUAGE", "TERM", "TZ")
    env = {k: v for k, v in os.environ.items() if k in keep or k.startswith("LC_")}
    env.update(HOME=entry.pw_dir, USER=name, LOGNAME=name, SHELL=entry.pw_shell)
    uid, gid = entry.pw_uid, entry.pw_gid
    groups = os.getgrouplist(name, gid)
    if sys.version_info >= (3, 9):  # noqa: UP036 - the guest's Python may be 3.6
        # Done by subprocess in C between fork and exec: no Python code in the child.
        return {"env": env, "user": uid, "group": gid, "extra_groups": groups}

    def switch() -> None:  # Python 3.6-3.8 (CentOS 8): system calls only, no NSS
        os.setgroups(groups)
        os.setgid(gid)
        os.setuid(uid)

    return {"env": env, "preexec_fn": switch}


def start_watchdog() -> int:
    """Fork the watchdog; the pipe that tells it the command groups, one per line.

    It outlives the executor: when the pipe ends, however the executor ended (a
    SIGKILL included), it kills every group still listed and exits. Forked first,
    before any thread or command, and it keeps nothing open but the pipe (no channel).
    PR_SET_PDEATHSIG would need code run in each child (a preexec_fn) and would reach
    the command's shell only, not what the shell started.
    """
    read_end, write_end = os.pipe()
    if os.fork() != 0:
        os.close(read_end)
        return write_end
    try:
        os.close(write_end)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        guard(read_end)
    finally:
        os._exit(0)


def guard(pipe: int) -> None:
    """The watchdog's loop: track the groups listed on ``pipe``, kill them at its end."""
    groups = set()  # type: typing.Set[int]
    rest = b""
    while True:
        data = os.read(pipe, CHUNK)
        if not data:
            break
        lines = (rest + data).split(b"\n")
        rest = lines.pop()
        for line in lines:
            if line.startswith(b"+"):
                groups.add(int(line[1:]))
            else:
                groups.discard(int(line[1:]))
    for pgid in groups:
        signal_group(pgid, signal.SIGKILL)


def signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(OSError):  # already gone
        os.killpg(pgid, sig)


if __name__ == "__main__":
    Executor(start_watchdog()).serve()

"""The SSH logins of one guest, which one runs a command, and how it runs there.

Commands run as the guest user `devbox` unless told otherwise: it has the host user's
uid and gid, so what a test writes into /code belongs to the person who ran pytest,
on virtiofs and 9p alike, and they can delete their build products. Root is one
argument away (``user="root"``); any other guest user is reached through sudo from
root's login. Each login is its own SSH connection (the devbox one opened on first
use), so no command pays for a sudo.

Each login runs its commands through its own resident executor (transport/executor.py) when the
exec mode is ``auto`` and the guest has a Python 3, else one SSH exec channel per
command (mode ``ssh``, or a guest without Python 3: said once in the log).
"""

from __future__ import annotations

import shlex
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..config.settings import EXEC_CHOICES, GUEST_USER
from ..errors import CommandFailed, CommandTimeout
from ..log import Log
from ..result import Result
from .exec_channel import OUTPUT_LIMIT, for_history, shell_argv
from .executor import PYTHONS, Executor
from .ssh import Connection

ROOT = "root"
# How long the first command as the devbox user may wait for its login.
LOGIN_TIMEOUT = 60.0


class Login:
    """One SSH login's commands: through its executor (mode ``auto``) or plain SSH."""

    def __init__(
        self,
        conn: Connection,
        mode: str = "auto",
        log: Log = print,
        pythons: Sequence[str] = PYTHONS,
    ) -> None:
        if mode not in EXEC_CHOICES:
            raise ValueError(f"unknown exec mode {mode!r}: use auto or ssh")
        self.conn = conn
        self.mode = mode
        self.fallback: str | None = None
        """Why this login runs commands over plain SSH in mode auto (None: it does not)."""
        self._log = log
        self._pythons = pythons
        self._executor: Executor | None = None
        self._lock = threading.Lock()

    @property
    def history(self) -> deque[Result]:
        return self.conn.history

    def executor(self) -> Executor | None:
        """The running executor, started (or replaced, if it died) now; None: use SSH."""
        if self.mode == "ssh":
            return None
        with self._lock:
            if self.fallback is not None:
                return None
            if self._executor is None or self._executor.dead is not None:
                started = Executor.start(self.conn, self._pythons)
                if isinstance(started, str):
                    self.fallback = started
                    self._log(
                        f"devbox: {self.conn.username}@{self.conn.host}:{self.conn.port}: no "
                        f"executor ({started}); commands run over plain SSH"
                    )
                    return None
                self._executor = started
            return self._executor

    def run(
        self,
        cmd: str | Sequence[str],
        *,
        check: bool = True,
        timeout: float | None = None,
        cwd: str | None = "/code",
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        stdin: str | bytes | None = None,
        output_limit: int | None = OUTPUT_LIMIT,
    ) -> Result:
        """Like :meth:`Connection.run`, through the executor when there is one."""
        executor = self.executor()
        if executor is None:
            return self.conn.run(
                cmd,
                check=check,
                timeout=timeout,
                cwd=cwd,
                env=env,
                user=user,
                stdin=stdin,
                output_limit=output_limit,
            )
        command = cmd if isinstance(cmd, str) else shlex.join(cmd)
        # root's executor becomes another user itself: a sudo costs 0.4 s under emulation.
        switch = user if self.conn.username == ROOT else None
        argv = shell_argv(command, cwd, env, None if switch else user)
        data = stdin.encode("utf-8") if isinstance(stdin, str) else stdin
        result, timed_out = executor.run(command, argv, data, timeout, switch, output_limit)
        self.history.append(for_history(result))
        if timed_out:
            assert timeout is not None
            raise CommandTimeout(result, timeout)
        if check and result.failed:
            raise CommandFailed(result)
        return result

    def stop_executor(self) -> None:
        """End this login's executor and every command it runs in the guest; the next
        command starts a new one (after an interrupt that may have cut a frame short)."""
        with self._lock:
            if self._executor is not None:
                self._executor.close()
                self._executor = None

    def close(self) -> None:
        self.stop_executor()
        self.conn.close()


class Logins:
    """root's login (connected during boot) and the devbox user's (made when needed)."""

    def __init__(self, root: Connection, mode: str = "auto", log: Log = print) -> None:
        self.root = Login(root, mode, log)
        self._mode = mode
        self._log = log
        self._user: Login | None = None
        self._lock = threading.Lock()

    @property
    def history(self) -> deque[Result]:
        """Every login's recent commands, oldest first (one shared deque)."""
        return self.root.history

    def _user_login(self) -> Login:
        with self._lock:
            if self._user is None:
                r = self.root.conn
                user = r.twin(GUEST_USER)
                user.history = r.history
                user.connect(timeout=LOGIN_TIMEOUT)
                self._user = Login(user, self._mode, self._log)
            return self._user

    def login_for(self, user: str | None) -> tuple[Login, str | None]:
        """The login that runs as ``user`` (None: devbox), and the user to sudo to."""
        if user in (None, GUEST_USER):
            return self._user_login(), None
        if user == ROOT:
            return self.root, None
        return self.root, user

    def run(
        self,
        cmd: str | Sequence[str],
        *,
        check: bool,
        timeout: float | None,
        cwd: str | None,
        env: Mapping[str, str] | None,
        user: str | None,
        stdin: str | bytes | None,
        output_limit: int | None = OUTPUT_LIMIT,
    ) -> Result:
        login, sudo_to = self.login_for(user)
        return login.run(
            cmd,
            check=check,
            timeout=timeout,
            cwd=cwd,
            env=env,
            user=sudo_to,
            stdin=stdin,
            output_limit=output_limit,
        )

    def put(self, local: Path | str, remote: str, user: str | None) -> None:
        self._sftp_login(user).put(local, remote)

    def get(self, remote: str, local: Path | str, user: str | None) -> None:
        self._sftp_login(user).get(remote, local)

    def _sftp_login(self, user: str | None) -> Connection:
        login, sudo_to = self.login_for(user)
        if sudo_to is not None:
            raise ValueError(f"files can be copied as {GUEST_USER} or {ROOT}, not as {user!r}")
        return login.conn

    def stop_executors(self) -> None:
        """`Login.stop_executor` of every login opened so far; connections stay."""
        self.root.stop_executor()
        with self._lock:
            user = self._user
        if user is not None:
            user.stop_executor()

    def close(self) -> None:
        self.root.close()
        with self._lock:
            if self._user is not None:
                self._user.close()

"""The SSH logins of one guest, and which one runs a command.

Commands run as the guest user `devbox` unless told otherwise: it has the host user's
uid and gid, so what a test writes into /code belongs to the person who ran pytest,
on virtiofs and 9p alike, and they can delete their build products. Root is one
argument away (``user="root"``); any other guest user is reached through sudo from
root's login. Each login is its own SSH connection (the devbox one opened on first
use), so no command pays for a sudo.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path

from .result import Result
from .ssh import Connection

GUEST_USER = "devbox"
ROOT = "root"
# How long the first command as the devbox user may wait for its login.
LOGIN_TIMEOUT = 60.0


class Logins:
    """root's connection (made during boot) and the devbox user's (made when needed)."""

    def __init__(self, root: Connection) -> None:
        self.root = root
        self._user: Connection | None = None
        self._lock = threading.Lock()

    @property
    def history(self) -> deque[Result]:
        """Every login's recent commands, oldest first (one shared deque)."""
        return self.root.history

    def _user_login(self) -> Connection:
        with self._lock:
            if self._user is None:
                r = self.root
                user = Connection(
                    r.host,
                    r.port,
                    username=GUEST_USER,
                    key_path=r.key_path,
                    known_hosts=r.known_hosts,
                    host_key_alias=r.host_key_alias,
                )
                user.history = r.history
                user.connect(timeout=LOGIN_TIMEOUT)
                self._user = user
            return self._user

    def login_for(self, user: str | None) -> tuple[Connection, str | None]:
        """The connection that runs as ``user`` (None: devbox), and the user to sudo to."""
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
    ) -> Result:
        login, sudo_to = self.login_for(user)
        return login.run(
            cmd, check=check, timeout=timeout, cwd=cwd, env=env, user=sudo_to, stdin=stdin
        )

    def put(self, local: Path | str, remote: str, user: str | None) -> None:
        self._sftp_login(user).put(local, remote)

    def get(self, remote: str, local: Path | str, user: str | None) -> None:
        self._sftp_login(user).get(remote, local)

    def _sftp_login(self, user: str | None) -> Connection:
        login, sudo_to = self.login_for(user)
        if sudo_to is not None:
            raise ValueError(f"files can be copied as {GUEST_USER} or {ROOT}, not as {user!r}")
        return login

    def close(self) -> None:
        self.root.close()
        with self._lock:
            if self._user is not None:
                self._user.close()

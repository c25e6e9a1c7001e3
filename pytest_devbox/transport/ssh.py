"""SSH to guests: one reused paramiko Transport per machine, its channels and files.

Threads may share a Connection: transport/channel_slots.py keeps its channels in flight below what
the guest's sshd allows. A refused channel open is retried, not a lost connection,
which is declared only when the transport itself is gone.
"""

from __future__ import annotations

import contextlib
import shlex
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import paramiko

from ..errors import CommandFailed, CommandTimeout, SSHError
from ..result import Result, shorten
from .banner import probe_banner
from .channel_slots import MAX_CHANNELS, ChannelSlots
from .exec_channel import OUTPUT_LIMIT, execute, for_history, stop_script, wire_command
from .keys import check_host_key, host_key_algorithms, load_private_key, pinned_keys
from .openssh import openssh_argv

__all__ = ["MAX_CHANNELS", "Connection", "Result", "probe_banner"]

HISTORY_LENGTH = 20
CHANNEL_WAIT = 60.0
"""Seconds a refused channel open keeps being retried before it is an error."""

# What paramiko raises when a channel or its transport fails under us.
TRANSPORT_ERRORS = (paramiko.SSHException, EOFError, OSError)


class Connection:
    """An SSH connection to one guest: one paramiko Transport reused for every command.

    ``known_hosts`` is a file pytest-devbox owns (never ``~/.ssh/known_hosts``); the
    guest's host key is pinned there under ``host_key_alias`` (the forwarded port
    changes on every boot, the image's host key does not). The first connection pins
    the key, later ones must present the same key.

    Threads may share it: ``max_channels`` commands or transfers run at once, the others
    wait; a refused channel open is retried for up to ``channel_wait`` seconds.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        username: str = "root",
        key_path: Path,
        known_hosts: Path,
        host_key_alias: str,
        max_channels: int = MAX_CHANNELS,
        channel_wait: float = CHANNEL_WAIT,
        opener: Callable[[float], Any] | None = None,
        via: Sequence[str] = (),
    ) -> None:
        self.host = host
        self.port = port
        self._where = f"{host}:{port}"  # for messages
        self.username = username
        self.key_path = Path(key_path)
        self.known_hosts = Path(known_hosts)
        self.host_key_alias = host_key_alias
        self.channel_wait = channel_wait
        # A host:port not on this machine: remote.Tunnel.open (called again on every
        # reconnect), and the OpenSSH options that reach it alike (ssh_command).
        self._opener = opener
        self._via = list(via)
        self.history: deque[Result] = deque(maxlen=HISTORY_LENGTH)  # shown in failure reports
        self._transport: paramiko.Transport | None = None
        self._connect_timeout = 30.0
        self._slots = ChannelSlots(max_channels)
        # Guards _transport: one thread (re)connects while the others wait for it.
        self._lock = threading.RLock()

    def twin(self, username: str) -> Connection:
        """A new connection to the same guest, reached the same way, as ``username``."""
        return Connection(
            self.host,
            self.port,
            username=username,
            key_path=self.key_path,
            known_hosts=self.known_hosts,
            host_key_alias=self.host_key_alias,
            opener=self._opener,
            via=self._via,
        )

    def __repr__(self) -> str:
        return f"<Connection {self.username}@{self.host}:{self.port} ({self.host_key_alias})>"

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def refused_opens(self) -> int:
        """How many channel opens the server refused (each was retried)."""
        return self._slots.refused

    @property
    def max_channels(self) -> int:
        """Channels this connection keeps open at once at most."""
        return self._slots.limit

    @property
    def connected(self) -> bool:
        """True while the transport is up and authenticated."""
        t = self._transport
        return t is not None and t.is_active() and t.is_authenticated()

    # -- connecting --

    def connect(self, timeout: float) -> None:
        """Open the transport, check or pin the host key, and authenticate.

        ``timeout`` bounds each phase (TCP, banner and key exchange, authentication).
        Raises :class:`HostKeyMismatch` when the guest's host key differs from the pinned
        one and :class:`SSHError` on any other failure.
        """
        with self._lock:
            self.close()
            self._connect_timeout = timeout
            pkey = load_private_key(self.key_path)
            try:
                sock = (
                    self._opener(timeout)
                    if self._opener is not None
                    else socket.create_connection((self.host, self.port), timeout=timeout)
                )
            except OSError as e:
                raise SSHError(
                    f"cannot reach SSH at {self._where}: {e}; "
                    "is the guest running and its port forwarded?"
                ) from e
            transport = paramiko.Transport(sock)
            try:
                self._handshake(transport, timeout)
                self._authenticate(transport, pkey)
                transport.set_keepalive(15)
            except BaseException:
                transport.close()
                raise
            self._transport = transport

    def _handshake(self, transport: paramiko.Transport, timeout: float) -> None:
        """Banner, key exchange and the host key check (or pin, the first time)."""
        transport.banner_timeout = timeout
        transport.auth_timeout = timeout
        pinned = pinned_keys(self.known_hosts, self.host_key_alias)
        if pinned:
            # Ask only for key types we have pinned, like OpenSSH does.
            transport.get_security_options().key_types = host_key_algorithms(pinned)
        try:
            transport.start_client(timeout=timeout)
        except TRANSPORT_ERRORS as e:
            raise SSHError(
                f"SSH handshake with {self._where} failed within {timeout:g} s ({e}); "
                "the guest's sshd may not be up yet or may have crashed: "
                "check the guest's serial console log"
            ) from e
        if not (transport.is_active() and transport.initial_kex_done):
            # start_client() returns quietly when its own timeout expires.
            raise SSHError(
                f"no SSH handshake with {self._where} within {timeout:g} s (no banner or key "
                "exchange); the guest's sshd may not be up yet: check its serial console log"
            )
        key = transport.get_remote_server_key()
        check_host_key(self.known_hosts, self.host_key_alias, key, self._where)

    def _authenticate(self, transport: paramiko.Transport, pkey: paramiko.PKey) -> None:
        try:
            transport.auth_publickey(self.username, pkey)
        except paramiko.AuthenticationException as e:
            raise SSHError(
                f"{self.username}@{self._where} refused the key {self.key_path} ({e}); the "
                "image was probably built with another public key: rebuild the image "
                "(--devbox-rebuild) so the current key is injected"
            ) from e
        except TRANSPORT_ERRORS as e:
            raise SSHError(f"SSH authentication with {self._where} failed: {e}") from e

    def close(self) -> None:
        """Close the transport (idempotent); the next command reconnects."""
        with self._lock:
            if self._transport is not None:
                self._transport.close()
                self._transport = None

    def _discard(self, transport: paramiko.Transport) -> None:
        """Forget a transport found dead, unless another thread already replaced it."""
        transport.close()
        with self._lock:
            if self._transport is transport:
                self._transport = None

    def _live_transport(self) -> paramiko.Transport:
        """The transport, (re)connecting when there is none or it died."""
        with self._lock:
            if not self.connected:
                self.connect(self._connect_timeout)
            assert self._transport is not None
            return self._transport

    # -- channels --

    @contextlib.contextmanager
    def _channel(self) -> Iterator[paramiko.Channel]:
        """An open session channel holding one of the ``max_channels`` slots."""
        with self._slots.hold():
            channel = self._open_channel(self.channel_wait)
            try:
                yield channel
            finally:
                channel.close()

    def open_session(self) -> paramiko.Channel:
        """A session channel outside the slots, for one long-lived user (an executor)."""
        return self._open_channel(self.channel_wait)

    def _open_channel(self, wait: float) -> paramiko.Channel:
        """Open a session channel: retry refusals, reconnect once if the transport died."""
        give_up = time.monotonic() + wait
        delay = 0.05
        reconnected = False
        while True:
            transport = self._live_transport()
            closes = self._slots.closes
            try:
                return transport.open_session(timeout=max(1.0, give_up - time.monotonic()))
            except TRANSPORT_ERRORS as e:
                if not transport.is_active():
                    self._discard(transport)
                    if reconnected:
                        raise SSHError(
                            f"the SSH connection to {self._where} closed again right after "
                            f"reconnecting ({_seen(transport, e)})"
                        ) from e
                    reconnected = True  # like testinfra: a dead transport is replaced once
                    continue
                # The transport is fine: the server refused this channel (MaxSessions).
                if time.monotonic() + delay > give_up:
                    raise SSHError(
                        f"the SSH server at {self._where} refused to open a session for "
                        f"{wait:g} s ({e!r}); its MaxSessions is below this connection's "
                        f"max_channels={self._slots.limit}, or its sessions linger: raise "
                        "MaxSessions in the guest's sshd_config or lower max_channels"
                    ) from e
                self._slots.wait_after_refusal(closes, delay)
                delay = min(delay * 2, 0.5)

    def _lost(self, channel: paramiko.Channel, doing: str, e: BaseException) -> SSHError:
        """The error for a channel that failed while ``doing``; drops a dead transport."""
        transport = channel.get_transport()
        if transport.is_active():
            return SSHError(
                f"the SSH server at {self._where} failed {doing} on a live connection ({e!r})"
            )
        self._discard(transport)
        return SSHError(
            f"the SSH connection to {self._where} dropped while {doing}: "
            f"{_seen(transport, e)}; the guest's serial console log shows whether it "
            "crashed or rebooted"
        )

    # -- commands --

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
        """Run ``cmd`` in the guest under ``sh -c`` and return its :class:`Result`.

        A string is shell code; a list is quoted argument by argument. ``cwd`` is
        entered first (the command fails if it is missing); ``env`` is exported in the
        shell, not through sshd; ``user`` runs the command as that guest user through
        ``sudo -n``. ``stdin`` is fed to the command, which otherwise reads end-of-file.
        Raises :class:`CommandFailed` on a non-zero exit when ``check`` is true, and
        :class:`CommandTimeout` after ``timeout`` seconds, once the remote command's
        whole process group has been stopped. Of each output stream the Result keeps
        ``output_limit`` bytes at most (None: all): the first and the last half, with
        a "... N bytes dropped ..." line between.
        """
        command = cmd if isinstance(cmd, str) else shlex.join(cmd)
        wire = wire_command(command, cwd, env, user)
        data = stdin.encode("utf-8") if isinstance(stdin, str) else stdin
        with self._channel() as channel:
            try:
                result, timed_out = execute(
                    channel, command, wire, data, timeout, self._stop_remote, output_limit
                )
            except TRANSPORT_ERRORS as e:
                raise self._lost(channel, f"running `{shorten(command, 200)}`", e) from e
            self.history.append(for_history(result))
            if timed_out:
                assert timeout is not None
                raise CommandTimeout(result, timeout)
            if result.exit_status is None and not channel.get_transport().is_active():
                lost = self._lost(channel, f"running `{shorten(command, 200)}`", EOFError())
                raise SSHError(f"{lost}\n{result.tails()}")
        if check and result.failed:
            raise CommandFailed(result)
        return result

    def _stop_remote(self, pgid: int | None) -> None:
        """Stop a timed-out or interrupted command's remote process group (best effort)."""
        if pgid is None or not self.connected:
            return
        # Plumbing, not something the user ran: it stays out of the history. It takes no
        # slot: the command it stops holds one, and every slot may be held by such.
        with contextlib.suppress(*TRANSPORT_ERRORS, SSHError):
            channel = self._open_channel(10.0)
            try:
                wire = wire_command(stop_script(pgid), None, None, None)
                execute(channel, "stop", wire, None, 10, lambda _: None)
            finally:
                channel.close()

    # -- files --

    def put(self, local: Path | str, remote: str) -> None:
        """Copy a local file to ``remote`` in the guest over SFTP, keeping its mode bits.

        A relative ``remote`` is relative to the login user's home directory.
        """
        local = Path(local)
        with self._sftp() as sftp:
            try:
                sftp.put(str(local), remote)
                sftp.chmod(remote, stat.S_IMODE(local.stat().st_mode))
            except OSError as e:
                raise SSHError(
                    f"cannot copy {local} to guest:{remote} ({e}); does the local file and "
                    "the remote directory exist?"
                ) from e

    def get(self, remote: str, local: Path | str) -> None:
        """Copy the guest's file ``remote`` to ``local`` over SFTP."""
        local = Path(local)
        with self._sftp() as sftp:
            try:
                sftp.get(remote, str(local))
            except OSError as e:
                raise SSHError(
                    f"cannot copy guest:{remote} to {local} ({e}); does the remote file and "
                    "the local directory exist?"
                ) from e

    @contextlib.contextmanager
    def _sftp(self) -> Iterator[paramiko.SFTPClient]:
        """An SFTP session on a channel that holds a slot like a command's."""
        with self._channel() as channel:
            try:
                channel.invoke_subsystem("sftp")
                sftp = paramiko.SFTPClient(channel)
            except (paramiko.SSHException, EOFError) as e:
                if not channel.get_transport().is_active():
                    raise self._lost(channel, "starting SFTP", e) from e
                raise SSHError(
                    f"the guest at {self._where} refused the SFTP subsystem ({e}); "
                    "is sftp-server installed there?"
                ) from e
            try:
                yield sftp
            finally:
                sftp.close()

    def ssh_command(self) -> list[str]:
        """An OpenSSH command line that reaches the same guest, for a person to paste
        (openssh.py: nothing of the user's own session goes to the guest)."""
        return openssh_argv(
            host=self.host,
            port=self.port,
            username=self.username,
            key_path=self.key_path,
            known_hosts=self.known_hosts,
            host_key_alias=self.host_key_alias,
            via=self._via,
        )


def _seen(transport: paramiko.Transport, e: BaseException) -> str:
    """What we saw of a dead transport: its own recorded error, else the one raised."""
    reason = transport.get_exception() or e
    return f"transport closed ({reason!r})" if str(reason) else "transport closed"

"""A remote libvirt host reached over SSH: its URI's parts, and the tunnel to its loopback.

A guest on a remote host has its SSH port forwarded by QEMU on that host's 127.0.0.1
(domain.forward_port), never on its other addresses. We reach it through an SSH
connection to the same host the libvirt URI names (user, port, `keyfile=`,
`no_verify=`, `known_hosts=` as libvirt reads them), one `direct-tcpip` channel per
guest connection. Like libvirt's ssh transport (which runs OpenSSH), the host is
resolved through ~/.ssh/config (HostName, Port, User, IdentityFile), the URI's own
user and port first. A person reaches it the same way: `ssh -J` (or a ProxyCommand
when the URI carries a key file or skips host key checks).
"""

from __future__ import annotations

import getpass
import shlex
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import paramiko

from ..errors import HostNotReady, SSHError
from .banner import read_banner

SSH_PORT = 22
SSH_CONFIG = Path("~/.ssh/config")
# What paramiko raises when the tunnel's transport fails.
_TUNNEL_ERRORS = (paramiko.SSHException, EOFError, OSError)


@dataclass(frozen=True)
class RemoteHost:
    """Where a `qemu+ssh://` URI points, and how libvirt's ssh transport is told to log in."""

    uri: str
    host: str
    user: str
    port: int = SSH_PORT
    keyfile: Path | None = None
    no_verify: bool = False
    known_hosts: Path | None = None

    @property
    def login(self) -> str:
        return f"{self.user}@{self.host}"

    def describe(self) -> str:
        return f"{self.login}:{self.port}"


def parse_uri(uri: str) -> RemoteHost | None:
    """The remote host of ``uri``; None for a local URI (no host part).

    HostNotReady for a remote URI whose transport is not ssh: the guest's port is only
    on the remote host's loopback, and only an SSH connection reaches it.
    """
    parts = urlsplit(uri)
    if not parts.netloc:
        return None
    transport = parts.scheme.partition("+")[2]
    if transport not in ("ssh", "libssh", "libssh2"):
        raise HostNotReady(
            f"{uri}: remote guests need an SSH transport (qemu+ssh://USER@HOST/system): "
            "their SSH port is forwarded on the remote host's loopback only"
        )
    if not parts.hostname:
        raise HostNotReady(f"{uri}: no host name in the libvirt URI")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    keyfile = query.get("keyfile")
    known_hosts = query.get("known_hosts")
    return RemoteHost(
        uri=uri,
        host=parts.hostname,
        user=parts.username or getpass.getuser(),
        port=parts.port or SSH_PORT,
        keyfile=Path(keyfile).expanduser() if keyfile else None,
        no_verify=query.get("no_verify", "0") not in ("", "0"),
        known_hosts=Path(known_hosts).expanduser() if known_hosts else None,
    )


def _explicit(remote: RemoteHost) -> tuple[list[str], str]:
    """``-p PORT`` and ``[USER@]HOST`` as the URI spells them: what it leaves out,
    OpenSSH takes from ~/.ssh/config, as libvirt's ssh transport lets it."""
    parts = urlsplit(remote.uri)
    port = ["-p", str(parts.port)] if parts.port else []
    return port, f"{parts.username}@{remote.host}" if parts.username else remote.host


def jump_options(remote: RemoteHost) -> list[str]:
    """OpenSSH options that reach the remote host's loopback through the remote host.

    Plain `-J [USER@]HOST[:PORT]` when the URI says nothing more; otherwise a
    ProxyCommand, since `-J` cannot carry the jump host's key file or host key policy.
    """
    port, dest = _explicit(remote)
    if remote.keyfile is None and not remote.no_verify and remote.known_hosts is None:
        return ["-J", dest + (f":{port[1]}" if port else "")]
    jump = ["ssh", *port]
    if remote.keyfile is not None:
        jump += ["-i", str(remote.keyfile), "-o", "IdentitiesOnly=yes"]
    if remote.known_hosts is not None:
        jump += ["-o", f"UserKnownHostsFile={remote.known_hosts}"]
    if remote.no_verify:
        jump += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
    jump += ["-W", "%h:%p", dest]
    return ["-o", f"ProxyCommand={shlex.join(jump)}"]


@dataclass(frozen=True)
class Target:
    """Where the tunnel connects, as OpenSSH would resolve the URI's host."""

    host: str
    port: int
    user: str
    keyfiles: tuple[str, ...] = ()


def resolve(remote: RemoteHost, config: Path = SSH_CONFIG) -> Target:
    """``remote`` through ssh_config(5) ``config``: the URI's user, port and key file
    win, then the config's User, Port, IdentityFile; its HostName replaces the name."""
    path = config.expanduser()
    try:
        found = (
            paramiko.SSHConfig.from_path(str(path)).lookup(remote.host) if path.is_file() else {}
        )
    except (OSError, ValueError, paramiko.SSHException) as e:
        raise SSHError(
            f"cannot read {path} for the host of {remote.uri} ({e}); fix that file, as "
            "libvirt's ssh transport (OpenSSH) reads it too"
        ) from e
    parts = urlsplit(remote.uri)
    try:
        port = parts.port or int(found.get("port", remote.port))
    except ValueError as e:
        raise SSHError(f"{path}: Port of {remote.host} is not a number ({e})") from e
    keyfiles = [str(remote.keyfile)] if remote.keyfile else found.get("identityfile", [])
    return Target(
        host=found.get("hostname", remote.host),
        port=port,
        user=parts.username or found.get("user", remote.user),
        keyfiles=tuple(keyfiles),
    )


class Tunnel:
    """One SSH connection to the remote host, opened on first use and reopened when it
    died; every guest connection is a `direct-tcpip` channel to a port on its loopback."""

    def __init__(
        self, remote: RemoteHost, *, timeout: float = 30.0, ssh_config: Path = SSH_CONFIG
    ) -> None:
        self.remote = remote
        self.timeout = timeout
        self.ssh_config = ssh_config
        self._client: paramiko.SSHClient | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Tunnel {self.remote.describe()}>"

    def _transport(self) -> paramiko.Transport:
        with self._lock:
            client = self._client
            transport = client.get_transport() if client is not None else None
            if transport is not None and transport.is_active():
                return transport
            if client is not None:
                client.close()
            self._client = self._connect()
            transport = self._client.get_transport()
            assert transport is not None
            return transport

    def _connect(self) -> paramiko.SSHClient:
        r = self.remote
        to = resolve(r, self.ssh_config)
        client = paramiko.SSHClient()
        self._load_host_keys(client)
        # no_verify=1: like libvirt's ssh transport (StrictHostKeyChecking=no), a key not
        # known is accepted (in memory only, never written anywhere); one that
        # contradicts known_hosts is still refused (BadHostKeyException), as OpenSSH does.
        policy = paramiko.AutoAddPolicy() if r.no_verify else paramiko.RejectPolicy()
        client.set_missing_host_key_policy(policy)
        try:
            client.connect(
                to.host,
                to.port,
                username=to.user,
                key_filename=list(to.keyfiles) or None,  # type: ignore[arg-type]  # a list works
                allow_agent=True,
                look_for_keys=not to.keyfiles,
                timeout=self.timeout,
                banner_timeout=self.timeout,
                auth_timeout=self.timeout,
            )
        except (*_TUNNEL_ERRORS, socket.timeout) as e:
            client.close()
            port, dest = _explicit(r)
            changed = (
                " (its host key CHANGED)" if isinstance(e, paramiko.BadHostKeyException) else ""
            )
            raise SSHError(
                f"cannot open the SSH tunnel to {to.user}@{to.host}:{to.port}{changed} (the "
                f"host of {r.uri}): {e!r}; check that `{shlex.join(['ssh', *port, dest, 'true'])}` "
                "works (key, known_hosts)"
            ) from e
        transport = client.get_transport()
        assert transport is not None
        transport.set_keepalive(15)
        return client

    def _load_host_keys(self, client: paramiko.SSHClient) -> None:
        """~/.ssh/known_hosts, or the URI's known_hosts= file: SSHError if that is missing."""
        known = self.remote.known_hosts
        try:
            client.load_system_host_keys(str(known) if known else None)
        except OSError as e:
            raise SSHError(
                f"known_hosts={known} in {self.remote.uri} names no readable file ({e}); fix "
                "the path, or create the file (ssh-keyscan HOST >> FILE, checking the key)"
            ) from e

    def connect(self) -> None:
        """Log in now (or check the open connection): SSHError saying what failed."""
        self._transport()

    def open(self, port: int, timeout: float) -> paramiko.Channel:
        """A channel to 127.0.0.1:``port`` on the remote host, usable as a socket;
        the tunnel is reopened once if its connection died."""
        for attempt in (1, 2):
            transport = self._transport()
            try:
                return transport.open_channel(
                    "direct-tcpip", ("127.0.0.1", port), ("127.0.0.1", 0), timeout=timeout
                )
            except _TUNNEL_ERRORS as e:
                if transport.is_active() or attempt == 2:
                    raise SSHError(
                        f"the SSH server at {self.remote.describe()} did not forward to "
                        f"127.0.0.1:{port} on its side ({e!r}); is the guest running, and "
                        "does its sshd allow TCP forwarding (AllowTcpForwarding)?"
                    ) from e
        raise AssertionError("unreachable")  # pragma: no cover

    def probe_banner(self, port: int, timeout: float) -> bool:
        """Like banner.probe_banner, on 127.0.0.1:``port`` of the remote host."""
        try:
            channel = self.open(port, timeout)
        except SSHError:
            return False
        try:
            return read_banner(channel, timeout)
        finally:
            channel.close()

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

"""SSH to guests: one reused paramiko Transport per machine, commands, files, readiness.

Every command runs under ``sh -c`` so its semantics are the same on every distro.
The login shell first prints its pid (sshd made it a session and process-group
leader) and then ``exec``s the wrapper, so a timed-out command can be stopped by
signalling that whole process group from a second channel: closing an exec
channel alone leaves a pty-less remote command running.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import hashlib
import os
import re
import select
import shlex
import socket
import stat
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .errors import CommandFailed, CommandTimeout, HostKeyMismatch, SSHError
from .fileio import atomic_write

__all__ = [
    "KEY_COMMENT",
    "Connection",
    "Result",
    "ensure_keypair",
    "probe_banner",
    "public_key_line",
]

KEY_COMMENT = "pytest-devbox"
PRIVATE_KEY_NAME = "id_ed25519"
HISTORY_LENGTH = 20

_CHUNK = 65536
_PID_MARKER = b"devbox-pid:"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# paramiko's transient failures when a transport has died under us.
_TRANSPORT_ERRORS = (paramiko.SSHException, EOFError, OSError)


@dataclass(frozen=True)
class Result:
    """The outcome of one command run in a guest."""

    command: str
    """The command line as sent (a list is shlex-quoted and joined)."""
    exit_status: int
    """The exit status; -1 when unknown (timed out, killed by a signal, connection lost)."""
    stdout: str
    stderr: str
    duration: float
    """Wall-clock seconds from sending the command to its end."""

    @property
    def ok(self) -> bool:
        """True when the command exited with status 0."""
        return self.exit_status == 0

    @property
    def failed(self) -> bool:
        """True when the command did not exit with status 0."""
        return not self.ok

    def tails(self, lines: int = 20) -> str:
        """The last ``lines`` lines of stdout and of stderr, each block labelled."""
        return "\n".join(_tail(name, text, lines) for name, text in self._streams())

    def describe_failure(self) -> str:
        """A one-line verdict (command, status, duration) followed by the stream tails."""
        shown = _shorten(self.command, 500)
        if self.exit_status == -1:
            verdict = (
                f"command `{shown}` ended without an exit status after {self.duration:.1f} s "
                "(killed by a signal, timed out, or the connection dropped)"
            )
        else:
            verdict = (
                f"command `{shown}` exited with status {self.exit_status} "
                f"after {self.duration:.1f} s"
            )
        return f"{verdict}\n{self.tails()}"

    def _streams(self) -> tuple[tuple[str, str], tuple[str, str]]:
        return (("stdout", self.stdout), ("stderr", self.stderr))


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _tail(name: str, text: str, lines: int) -> str:
    if not text.strip():
        return f"--- {name}: (empty) ---"
    all_lines = text.rstrip("\n").splitlines()
    shown = [_shorten(line, 1000) for line in all_lines[-lines:]]
    if len(all_lines) > len(shown):
        header = f"--- {name} (last {len(shown)} of {len(all_lines)} lines) ---"
    else:
        header = f"--- {name} ---"
    return header + "\n" + "\n".join(shown)


# --- client key pair ---------------------------------------------------------------------


def ensure_keypair(key_dir: Path) -> Path:
    """Return the cache's Ed25519 private key, creating the pair if it is missing.

    The pair is ``key_dir/id_ed25519`` (mode 0600) and ``id_ed25519.pub`` in a 0700
    directory. Refuses, with :class:`SSHError`, a private key that group or others can
    read and a directory that group or others can write (OpenSSH would refuse them too).
    Safe when several processes race to create the pair: exactly one key wins.
    """
    key_dir = Path(key_dir)
    if not key_dir.exists():
        key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(key_dir, 0o700)  # mkdir's mode is filtered by the umask
    _check_key_dir(key_dir)
    private = key_dir / PRIVATE_KEY_NAME
    if not private.exists():
        _create_private_key(private)
    _check_private_key(private)
    public = key_dir / (PRIVATE_KEY_NAME + ".pub")
    line = public_key_line(private)
    if not public.exists() or public.read_text(encoding="ascii", errors="replace").strip() != line:
        atomic_write(public, (line + "\n").encode("ascii"), 0o644)
    return private


def public_key_line(private_key: Path) -> str:
    """The authorized_keys line for a private key: ``ssh-ed25519 AAAA... pytest-devbox``."""
    key = _load_private_key(Path(private_key))
    return f"{key.get_name()} {key.get_base64()} {KEY_COMMENT}"


def _check_key_dir(key_dir: Path) -> None:
    st = key_dir.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise SSHError(f"SSH key directory {key_dir} is not a directory; remove it and retry")
    if st.st_mode & 0o022:
        raise SSHError(
            f"SSH key directory {key_dir} is writable by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}), so its key cannot be trusted; "
            f"fix it with: chmod 700 {shlex.quote(str(key_dir))}"
        )


def _check_private_key(private: Path) -> None:
    st = private.stat()
    if st.st_mode & 0o077:
        raise SSHError(
            f"SSH private key {private} is accessible by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); OpenSSH refuses such keys. "
            f"Fix it with: chmod 600 {shlex.quote(str(private))}"
        )
    if st.st_uid != os.geteuid():
        raise SSHError(
            f"SSH private key {private} belongs to uid {st.st_uid}, not to you "
            f"(uid {os.geteuid()}); use your own cache directory or chown the key"
        )


def _create_private_key(private: Path) -> None:
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    fd, tmp = tempfile.mkstemp(prefix=".id_ed25519.", dir=private.parent)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        # link() never replaces: when two processes race, the first key wins for both.
        with contextlib.suppress(FileExistsError):
            os.link(tmp, private)
    finally:
        os.unlink(tmp)


def _load_private_key(path: Path) -> paramiko.PKey:
    errors = []
    key_classes: tuple[type[paramiko.PKey], ...] = (
        paramiko.Ed25519Key,
        paramiko.ECDSAKey,
        paramiko.RSAKey,
    )
    for cls in key_classes:
        try:
            return cls.from_private_key_file(str(path))
        except FileNotFoundError:
            raise SSHError(
                f"SSH private key {path} does not exist; let pytest-devbox create it "
                "(ensure_keypair) or point key_path at an existing key"
            ) from None
        except (paramiko.SSHException, ValueError) as e:
            errors.append(f"{cls.__name__}: {e}")
    raise SSHError(
        f"cannot read SSH private key {path} ({'; '.join(errors)}); "
        "delete it to have a new pair created (images built with the old key need a rebuild)"
    )


def _fingerprint(key: paramiko.PKey) -> str:
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


# --- readiness ---------------------------------------------------------------------------


def probe_banner(host: str, port: int, timeout: float) -> bool:
    """True if an SSH server greets on ``host:port`` ("SSH-...") within ``timeout`` seconds.

    A forwarded port accepts connections before the guest's sshd runs (QEMU's user
    network answers for it), so an open port alone proves nothing; the banner does.
    """
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            data = b""
            while len(data) < 4:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                sock.settimeout(remaining)
                chunk = sock.recv(256)
                if not chunk:
                    return False
                data += chunk
            return data.startswith(b"SSH-")
    except OSError:
        return False


# --- connection --------------------------------------------------------------------------


class Connection:
    """An SSH connection to one guest: one paramiko Transport reused for every command.

    ``known_hosts`` is a file pytest-devbox owns (never ``~/.ssh/known_hosts``); the
    guest's host key is pinned there under ``host_key_alias`` (the forwarded port
    changes on every boot, the image's host key does not). The first connection pins
    the key, later ones must present the same key.
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
    ) -> None:
        self.host = host
        self.port = port
        self.username = username
        self.key_path = Path(key_path)
        self.known_hosts = Path(known_hosts)
        self.host_key_alias = host_key_alias
        self.history: collections.deque[Result] = collections.deque(maxlen=HISTORY_LENGTH)
        """The most recent results, oldest first (shown in failure reports)."""
        self._transport: paramiko.Transport | None = None
        self._connect_timeout = 30.0

    def __repr__(self) -> str:
        return f"<Connection {self.username}@{self.host}:{self.port} ({self.host_key_alias})>"

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

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
        self.close()
        self._connect_timeout = timeout
        pkey = _load_private_key(self.key_path)
        where = f"{self.host}:{self.port}"
        try:
            sock = socket.create_connection((self.host, self.port), timeout=timeout)
        except OSError as e:
            raise SSHError(
                f"cannot reach SSH at {where}: {e}; is the guest running and its port forwarded?"
            ) from e
        transport = paramiko.Transport(sock)
        try:
            transport.banner_timeout = timeout
            transport.auth_timeout = timeout
            pinned = self._pinned_keys()
            if pinned:
                # Ask only for key types we have pinned, like OpenSSH does.
                transport.get_security_options().key_types = _key_algorithms(pinned)
            try:
                transport.start_client(timeout=timeout)
            except (paramiko.SSHException, EOFError, OSError) as e:
                raise SSHError(
                    f"SSH handshake with {where} failed within {timeout:g} s ({e}); "
                    "the guest's sshd may not be up yet or may have crashed: "
                    "check the guest's serial console log"
                ) from e
            if not (transport.is_active() and transport.initial_kex_done):
                # start_client() returns quietly when its own timeout expires.
                raise SSHError(
                    f"no SSH handshake with {where} within {timeout:g} s; the guest's sshd "
                    "may not be up yet: check the guest's serial console log"
                )
            self._check_host_key(transport.get_remote_server_key(), pinned)
            try:
                transport.auth_publickey(self.username, pkey)
            except paramiko.AuthenticationException as e:
                raise SSHError(
                    f"{self.username}@{where} refused the key {self.key_path} ({e}); the image "
                    "was probably built with another public key: rebuild the image "
                    "(devbox prune) so the current key is injected"
                ) from e
            except (paramiko.SSHException, EOFError, OSError) as e:
                raise SSHError(f"SSH authentication with {where} failed: {e}") from e
            transport.set_keepalive(15)
        except BaseException:
            transport.close()
            raise
        self._transport = transport

    def close(self) -> None:
        """Close the transport (idempotent); the next command reconnects."""
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def _pinned_keys(self) -> dict[str, paramiko.PKey]:
        if not self.known_hosts.exists():
            return {}
        hostkeys = paramiko.HostKeys()
        try:
            hostkeys.load(str(self.known_hosts))
        except (OSError, paramiko.SSHException, ValueError) as e:
            raise SSHError(
                f"cannot read the pinned host keys in {self.known_hosts} ({e}); "
                "delete that file to pin the guests' keys anew"
            ) from e
        entry = hostkeys.lookup(self.host_key_alias)
        return dict(entry) if entry is not None else {}

    def _check_host_key(self, key: paramiko.PKey, pinned: dict[str, paramiko.PKey]) -> None:
        if not pinned:
            self._pin(key)
            return
        expected = pinned.get(key.get_name())
        if expected is not None and expected.asbytes() == key.asbytes():
            return
        was = ", ".join(f"{name} {_fingerprint(k)}" for name, k in pinned.items())
        kh = shlex.quote(str(self.known_hosts))
        raise HostKeyMismatch(
            f"the SSH host key of {self.host_key_alias} ({self.host}:{self.port}) changed: "
            f"it presented {key.get_name()} {_fingerprint(key)}, but {self.known_hosts} pins "
            f"{was}. If the image was rebuilt on purpose, forget the old key with: "
            f"ssh-keygen -R {shlex.quote(self.host_key_alias)} -f {kh}"
        )

    def _pin(self, key: paramiko.PKey) -> None:
        self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        hostkeys = paramiko.HostKeys()
        if self.known_hosts.exists():
            hostkeys.load(str(self.known_hosts))
        hostkeys.add(self.host_key_alias, key.get_name(), key)
        # Write aside then rename: a concurrent reader never sees half a file.
        fd, tmp = tempfile.mkstemp(prefix=".known_hosts.", dir=self.known_hosts.parent)
        os.close(fd)
        try:
            hostkeys.save(tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.known_hosts)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def _live_transport(self) -> paramiko.Transport:
        """The transport, (re)connecting when there is none or it died."""
        if not self.connected:
            self.connect(self._connect_timeout)
        assert self._transport is not None
        return self._transport

    def _open_channel(self) -> paramiko.Channel:
        # A dead transport is replaced once (like testinfra); a second failure is final.
        for attempt in (1, 2):
            transport = self._live_transport()
            try:
                return transport.open_session(timeout=self._connect_timeout)
            except _TRANSPORT_ERRORS as e:
                self.close()
                if attempt == 2:
                    raise SSHError(
                        f"SSH connection to {self.host}:{self.port} failed again after "
                        f"reconnecting ({e}); the guest may have crashed or rebooted"
                    ) from e
        raise AssertionError("unreachable")

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
    ) -> Result:
        """Run ``cmd`` in the guest under ``sh -c`` and return its :class:`Result`.

        A string is shell code; a list is quoted argument by argument. ``cwd`` is
        entered first (the command fails if it is missing); ``env`` is exported in the
        shell, not through sshd; ``user`` runs the command as that guest user through
        ``sudo -n``. ``stdin`` is fed to the command, which otherwise reads end-of-file.
        Raises :class:`CommandFailed` on a non-zero exit when ``check`` is true, and
        :class:`CommandTimeout` after ``timeout`` seconds, once the remote command's
        whole process group has been stopped.
        """
        command = cmd if isinstance(cmd, str) else shlex.join(cmd)
        wire = _wire_command(command, cwd, env, user)
        data = stdin.encode("utf-8") if isinstance(stdin, str) else stdin
        channel = self._open_channel()
        try:
            result, timed_out = self._execute(channel, command, wire, data, timeout)
        except _TRANSPORT_ERRORS as e:
            self.close()
            raise SSHError(
                f"the SSH connection to {self.host}:{self.port} failed while starting "
                f"`{_shorten(command, 200)}` ({e}); the guest may have crashed or rebooted"
            ) from e
        finally:
            channel.close()
        self.history.append(result)
        if timed_out:
            assert timeout is not None
            raise CommandTimeout(result, timeout)
        if result.exit_status == -1 and not self.connected:
            self.close()
            raise SSHError(
                f"the SSH connection to {self.host}:{self.port} dropped while running "
                f"`{_shorten(command, 200)}`; the guest may have crashed or rebooted\n"
                + result.tails()
            )
        if check and result.failed:
            raise CommandFailed(result)
        return result

    def _execute(
        self,
        channel: paramiko.Channel,
        command: str,
        wire: str,
        stdin: bytes | None,
        timeout: float | None,
    ) -> tuple[Result, bool]:
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        out = bytearray()
        err = bytearray()
        pgid: int | None = None
        header_done = False
        pending = memoryview(stdin) if stdin else None
        channel.exec_command(wire)
        if pending is None:
            channel.shutdown_write()
        # fileno() is readable while either stream has data, and after EOF.
        fd = channel.fileno()
        timed_out = False
        try:
            while True:
                while channel.recv_ready():
                    out += channel.recv(_CHUNK)
                while channel.recv_stderr_ready():
                    err += channel.recv_stderr(_CHUNK)
                if not header_done:
                    header_done, pgid = _strip_pid_header(out)
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
                    timed_out = True
                    break
                wait = 0.01 if pending is not None else 0.5
                if deadline is not None:
                    wait = min(wait, deadline - now)
                select.select([fd], [], [], wait)
            if not timed_out:
                # The exit status may trail the end of the output.
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not channel.status_event.wait(remaining):
                    timed_out = True
        except KeyboardInterrupt:
            self._stop_remote(pgid)
            raise
        if timed_out:
            self._stop_remote(pgid)
            while channel.recv_ready():
                out += channel.recv(_CHUNK)
            while channel.recv_stderr_ready():
                err += channel.recv_stderr(_CHUNK)
            if not header_done:
                _strip_pid_header(out)
            status = -1
        else:
            status = channel.recv_exit_status()
        result = Result(
            command=command,
            exit_status=status,
            stdout=out.decode("utf-8", errors="replace"),
            stderr=err.decode("utf-8", errors="replace"),
            duration=time.monotonic() - start,
        )
        return result, timed_out

    def _stop_remote(self, pgid: int | None) -> None:
        """Stop a remote command's process group: SIGTERM, then SIGKILL after 1 s."""
        if pgid is None or not self.connected:
            return
        g = f"-{pgid}"
        script = (
            f"kill -TERM {g} 2>/dev/null || exit 0; i=0; "
            f'while [ "$i" -lt 10 ] && kill -0 {g} 2>/dev/null; do sleep 0.1; i=$((i+1)); done; '
            f"kill -KILL {g} 2>/dev/null; exit 0"
        )
        # Plumbing, not something the user ran: it stays out of the history.
        try:
            channel = self._open_channel()
            try:
                self._execute(channel, "stop", _wire_command(script, None, None, None), None, 10)
            finally:
                channel.close()
        except (*_TRANSPORT_ERRORS, SSHError):
            pass  # best effort: the caller reports the original timeout

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
    def _sftp(self) -> collections.abc.Iterator[paramiko.SFTPClient]:
        channel = self._open_channel()
        try:
            channel.invoke_subsystem("sftp")
            sftp = paramiko.SFTPClient(channel)
        except (paramiko.SSHException, EOFError) as e:
            channel.close()
            raise SSHError(
                f"the guest at {self.host}:{self.port} refused the SFTP subsystem ({e}); "
                "is sftp-server installed there?"
            ) from e
        try:
            yield sftp
        finally:
            sftp.close()

    # -- for people --

    def ssh_command(self) -> list[str]:
        """An OpenSSH command line that reaches the same guest, for a person to paste."""
        return [
            "ssh",
            "-i",
            str(self.key_path),
            "-p",
            str(self.port),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            f"HostKeyAlias={self.host_key_alias}",
            "-o",
            "StrictHostKeyChecking=yes",
            f"{self.username}@{self.host}",
        ]


def _key_algorithms(pinned: Mapping[str, paramiko.PKey]) -> list[str]:
    algorithms: list[str] = []
    for name in pinned:
        if name == "ssh-rsa":
            algorithms += ["rsa-sha2-512", "rsa-sha2-256"]
        else:
            algorithms.append(name)
    return algorithms


def _wire_command(
    command: str,
    cwd: str | None,
    env: Mapping[str, str] | None,
    user: str | None,
) -> str:
    """The string sshd hands to the login shell for ``command``."""
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
    return f"echo {_PID_MARKER.decode()}$$; exec {shlex.join(argv)}"


def _strip_pid_header(out: bytearray) -> tuple[bool, int | None]:
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

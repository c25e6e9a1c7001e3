"""The client key pair and the guests' pinned host keys, both kept in the cache.

``known_hosts`` is a file pytest-devbox owns (never ``~/.ssh/known_hosts``). It is
changed only under a lock on a separate ``known_hosts.lock`` and replaced atomically:
concurrent sessions and xdist workers pin their guests' keys without dropping each
other's, and a reader never sees half a file.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import shlex
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path

import filelock
import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..errors import HostKeyMismatch, SSHError
from ..host.atomic import atomic_write

__all__ = [
    "KEY_COMMENT",
    "check_host_key",
    "ensure_keypair",
    "fingerprint",
    "host_key_algorithms",
    "load_private_key",
    "pin_host_key",
    "pinned_keys",
    "public_key_line",
]

KEY_COMMENT = "pytest-devbox"
PRIVATE_KEY_NAME = "id_ed25519"
# Pinning holds the lock for a read and one small write; a minute means a stuck holder.
KNOWN_HOSTS_LOCK_TIMEOUT = 60.0

# --- client key pair ---------------------------------------------------------------------


def ensure_keypair(key_dir: Path) -> Path:
    """Return the cache's Ed25519 private key, creating the pair if it is missing.

    The pair is ``key_dir/id_ed25519`` (mode 0600) and ``id_ed25519.pub`` in a 0700
    directory. Refuses, with :class:`SSHError`, a private key or a directory that group or
    others can access at all (the README's promise: 0600 in a 0700 directory).
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
    key = load_private_key(Path(private_key))
    return f"{key.get_name()} {key.get_base64()} {KEY_COMMENT}"


def load_private_key(path: Path) -> paramiko.PKey:
    """The private key at ``path`` (Ed25519, ECDSA or RSA), or a :class:`SSHError`."""
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


def _check_key_dir(key_dir: Path) -> None:
    st = key_dir.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise SSHError(f"SSH key directory {key_dir} is not a directory; remove it and retry")
    # 0700 as the README promises: a directory others can list or enter (0755) gives
    # away which keys exist and lets a later chmod slip open the key itself.
    if st.st_mode & 0o077:
        raise SSHError(
            f"SSH key directory {key_dir} is accessible by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}), so its key is not private; "
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


# --- pinned host keys --------------------------------------------------------------------


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's SHA256 fingerprint of a public key (``SHA256:...``)."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def pinned_keys(known_hosts: Path, alias: str) -> dict[str, paramiko.PKey]:
    """The host keys pinned for ``alias``, by key type; empty when none is."""
    entry = _load(known_hosts).lookup(alias)
    return dict(entry) if entry is not None else {}


def host_key_algorithms(pinned: Mapping[str, paramiko.PKey]) -> list[str]:
    """The host key algorithms to offer for the pinned key types, as OpenSSH does."""
    algorithms: list[str] = []
    for name in pinned:
        if name == "ssh-rsa":
            algorithms += ["rsa-sha2-512", "rsa-sha2-256"]
        else:
            algorithms.append(name)
    return algorithms


def check_host_key(known_hosts: Path, alias: str, key: paramiko.PKey, where: str) -> None:
    """Accept ``key`` if it is the one pinned for ``alias``; pin it if none is.

    Raises :class:`HostKeyMismatch` when ``alias`` pins another key of that type, or
    pins only keys of other types (the server was asked for those types only).
    """
    pinned = pinned_keys(known_hosts, alias)
    if not pinned:
        pin_host_key(known_hosts, alias, key, where)
        return
    _compare(known_hosts, alias, key, pinned, where)


def pin_host_key(known_hosts: Path, alias: str, key: paramiko.PKey, where: str) -> None:
    """Add ``key`` for ``alias`` to ``known_hosts``, keeping every other line.

    The read-modify-write runs under ``known_hosts.lock``. If another process pinned a
    different key for ``alias`` in the meantime, that pin wins and this raises
    :class:`HostKeyMismatch`.
    """
    lock = filelock.FileLock(str(known_hosts) + ".lock", timeout=KNOWN_HOSTS_LOCK_TIMEOUT)
    known_hosts.parent.mkdir(parents=True, exist_ok=True)
    try:
        with lock:
            hostkeys = _load(known_hosts)
            entry = hostkeys.lookup(alias)
            if entry is not None:
                _compare(known_hosts, alias, key, dict(entry), where)
                return
            hostkeys.add(alias, key.get_name(), key)
            atomic_write(known_hosts, _format(hostkeys), 0o644)
    except filelock.Timeout:
        raise SSHError(
            f"another process held {lock.lock_file} for {KNOWN_HOSTS_LOCK_TIMEOUT:g} s while "
            f"pinning the host key of {alias}; if no pytest-devbox session is running, "
            "delete that lock file and retry"
        ) from None


def _compare(
    known_hosts: Path, alias: str, key: paramiko.PKey, pinned: dict[str, paramiko.PKey], where: str
) -> None:
    expected = pinned.get(key.get_name())
    if expected is not None and expected.asbytes() == key.asbytes():
        return
    was = ", ".join(f"{name} {fingerprint(k)}" for name, k in pinned.items())
    kh = shlex.quote(str(known_hosts))
    raise HostKeyMismatch(
        f"the SSH host key of {alias} ({where}) changed: "
        f"it presented {key.get_name()} {fingerprint(key)}, but {known_hosts} pins "
        f"{was}. If the image was rebuilt on purpose, forget the old key with: "
        f"ssh-keygen -R {shlex.quote(alias)} -f {kh}"
    )


def _load(known_hosts: Path) -> paramiko.HostKeys:
    hostkeys = paramiko.HostKeys()
    try:
        hostkeys.load(str(known_hosts))
    except FileNotFoundError:
        pass
    except (OSError, paramiko.SSHException, ValueError) as e:
        raise SSHError(
            f"cannot read the pinned host keys in {known_hosts} ({e}); "
            "delete that file to pin the guests' keys anew"
        ) from e
    return hostkeys


def _format(hostkeys: paramiko.HostKeys) -> str:
    """The known_hosts text for ``hostkeys``, one ``alias type base64`` line per key."""
    lines = []
    for alias in hostkeys:
        for key_type, key in hostkeys[alias].items():
            lines.append(f"{alias} {key_type} {key.get_base64()}\n")
    return "".join(lines)

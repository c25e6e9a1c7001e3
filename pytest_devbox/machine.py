"""Machine: one running guest (transient domain + SSH connection + /code share).

The handle tests and the `devbox` command get. Usable without pytest:

    with Machine.start(profile, cache=ImageCache(root), code_dir=Path.cwd()) as m:
        print(m.run("uname -r").stdout)
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import socket
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Callable

import libvirt

from . import domain as dom
from .distros import Profile
from .errors import BootTimeout, GuestDied, HostKeyMismatch, HostNotReady, SSHError
from .host import resolve_accel
from .images import ImageCache, ImageInfo
from .keys import ensure_keypair
from .result import Result
from .ssh import Connection, probe_banner
from .sweep import run_dir, write_owner

GUEST_USER = "devbox"
# Deadlines for the whole boot (all phases together). Software emulation is 5-10x slower.
BOOT_TIMEOUT = {"kvm": 120.0, "tcg": 420.0}
POLL = 0.25
TRANSIENT_SSH = (OSError, EOFError, SSHError)


def new_run_id() -> str:
    return uuid.uuid4().hex[:8]


class Machine:
    """A running guest. Create with `Machine.start`; `close()` destroys it."""

    def __init__(
        self,
        *,
        profile: Profile,
        image: ImageInfo,
        virconn: libvirt.virConnect,
        domain: dom.Domain,
        ssh: Connection,
        overlay: Path,
        console_log: Path,
        boot_seconds: float,
        keep: bool,
    ) -> None:
        self.profile = profile
        self.image = image
        self._virconn = virconn
        self.domain = domain
        self._ssh = ssh
        self.overlay = overlay
        self.console_log = console_log
        self.boot_seconds = boot_seconds
        self.keep = keep
        self.closed = False

    @property
    def distro(self) -> str:
        return self.profile.name

    @property
    def name(self) -> str:
        return self.domain.name

    @property
    def history(self) -> deque[Result]:
        """The most recent commands run in this guest, oldest first."""
        return self._ssh.history

    # ---- starting -------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        profile: Profile,
        *,
        cache: ImageCache,
        code_dir: Path,
        uri: str = "qemu:///system",
        accel: str = "auto",
        run_id: str | None = None,
        rebuild: bool = False,
        keep: bool = False,
        boot_timeout: float | None = None,
        log: Callable[[str], None] = print,
    ) -> Machine:
        """Boot `profile` on a fresh overlay of its cached image and wait until it is usable."""
        code_dir = Path(code_dir).resolve()
        if not code_dir.is_dir():
            raise HostNotReady(f"code dir {code_dir} does not exist: pass an existing directory")
        chosen = resolve_accel(accel)
        image = cache.image_for(profile, rebuild=rebuild)
        run_id = run_id or new_run_id()
        workdir = run_dir(cache.root, run_id)
        write_owner(workdir)
        name = f"devbox-{profile.name}-{run_id}"
        if not keep:
            name += f"-{uuid.uuid4().hex[:4]}"  # several machines of a distro in one run
        overlay = cache.overlay(image.path, workdir / f"{name}.qcow2")
        console = workdir / f"{name}.console.log"
        spec = dom.DomainSpec(
            name=name,
            disk=overlay,
            code_dir=code_dir,
            share=profile.share,
            accel=chosen,
            memory_mib=profile.memory_mib,
            vcpus=profile.vcpus,
            console_log=console,
            metadata={
                "owner_pid": str(os.getpid()),
                "owner_host": socket.gethostname(),
                "run_id": run_id,
                "started": str(int(time.time())),
                "distro": profile.name,
                "overlay": str(overlay),
                "image_key": image.key,
                "keep": "1" if keep else "0",
            },
        )
        t0 = time.monotonic()
        virconn = dom.connect(uri)
        domain: dom.Domain | None = None
        try:
            domain = dom.Domain.create(virconn, spec, autodestroy=not keep)
            ssh = _wait_ready(
                domain,
                cache=cache,
                image=image,
                distro=profile.name,
                console=console,
                timeout=boot_timeout or BOOT_TIMEOUT[chosen],
            )
        except BaseException:
            # Half-started is torn down, whatever stopped us (error, Ctrl-C).
            if domain is not None:
                domain.destroy()
            _close_quietly(virconn)
            overlay.unlink(missing_ok=True)
            raise
        seconds = time.monotonic() - t0
        log(f"{profile.name}: ready in {seconds:.1f} s ({chosen}, {profile.share} /code)")
        return cls(
            profile=profile,
            image=image,
            virconn=virconn,
            domain=domain,
            ssh=ssh,
            overlay=overlay,
            console_log=console,
            boot_seconds=seconds,
            keep=keep,
        )

    # ---- using ----------------------------------------------------------------------------

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
        """Run `cmd` in the guest (a shell string, or a list that is quoted for you).

        Raises CommandFailed on a non-zero exit when `check`, CommandTimeout after `timeout`.
        `user="devbox"` runs as the guest user that has the host user's uid and gid.
        """
        return self._ssh.run(
            cmd, check=check, timeout=timeout, cwd=cwd, env=env, user=user, stdin=stdin
        )

    def put(self, local: Path | str, remote: str) -> None:
        """Copy a host file into the guest (SFTP)."""
        self._ssh.put(local, remote)

    def get(self, remote: str, local: Path | str) -> None:
        """Copy a guest file to the host (SFTP)."""
        self._ssh.get(remote, local)

    def ssh_argv(self) -> list[str]:
        """`ssh_command()` as an argument list."""
        return self._ssh.ssh_command()

    def ssh_command(self) -> str:
        """An OpenSSH command line a person can paste to log in to this guest."""
        return shlex.join(self._ssh.ssh_command())

    def console_tail(self, lines: int = 40) -> str:
        return tail_file(self.console_log, lines)

    # ---- stopping -------------------------------------------------------------------------

    def close(self) -> None:
        """Destroy the guest and delete its overlay. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self._ssh.close()
        self.domain.destroy()
        _close_quietly(self._virconn)
        self.overlay.unlink(missing_ok=True)

    def detach(self) -> None:
        """Leave the guest running (--devbox-keep): close only our side."""
        self.closed = True
        self._ssh.close()
        _close_quietly(self._virconn)

    def __enter__(self) -> Machine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Machine {self.name} {'closed' if self.closed else 'running'}>"


def host_key_alias(image: ImageInfo) -> str:
    """The name the guest's host key is pinned under: one per image build, since host
    keys are made when the image is built and ports change on every boot."""
    built = re.sub(r"[^0-9A-Za-z]", "", str(image.metadata.get("built_at", "")))
    return f"devbox-{image.path.stem}-{built}"


def tail_file(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    # Serial consoles emit CR LF and escape sequences; keep it readable.
    text = data.replace("\r", "")
    return "\n".join(text.splitlines()[-lines:])


def _close_quietly(virconn: libvirt.virConnect) -> None:
    # Closing a connection that already broke is not worth an error.
    with contextlib.suppress(libvirt.libvirtError):
        virconn.close()


def _wait_ready(
    domain: dom.Domain,
    *,
    cache: ImageCache,
    image: ImageInfo,
    distro: str,
    console: Path,
    timeout: float,
) -> Connection:
    """Phases with one deadline: running, forwarded, SSH banner, auth, /code mounted."""
    deadline = time.monotonic() + timeout
    phase = "running"

    def check_alive() -> None:
        state = domain.state()
        if state != "running":
            raise GuestDied(
                f"{distro}: the guest stopped while booting (state {state}) in phase {phase!r}",
                phase=phase,
                console_tail=tail_file(console, 40),
            )

    def expired() -> bool:
        return time.monotonic() > deadline

    check_alive()
    phase = "forwarded"
    port = domain.forward_port(22)
    phase = "ssh banner"
    while not probe_banner("127.0.0.1", port, timeout=2.0):
        check_alive()
        if expired():
            break
        time.sleep(POLL)
    else:
        phase = "auth"
    if phase == "auth":
        ssh = Connection(
            "127.0.0.1",
            port,
            key_path=ensure_keypair(cache.root / "ssh"),
            known_hosts=cache.root / "ssh" / "known_hosts",
            host_key_alias=host_key_alias(image),
        )
        while True:
            try:
                ssh.connect(timeout=max(1.0, min(15.0, deadline - time.monotonic())))
                break
            except HostKeyMismatch:
                raise
            except TRANSIENT_SSH:
                check_alive()
                if expired():
                    raise
                time.sleep(1.0)
        phase = "/code mounted"
        while True:
            r = ssh.run("mountpoint -q /code || mount /code", check=False, cwd=None, timeout=30)
            if r.ok:
                return ssh
            check_alive()
            if expired():
                ssh.close()
                raise BootTimeout(
                    f"{distro}: /code is not mounted in the guest: {r.stderr.strip()}",
                    phase=phase,
                    console_tail=tail_file(console, 40),
                )
            time.sleep(1.0)
    raise BootTimeout(
        f"{distro}: the guest did not get to {phase!r} within {timeout:.0f} s; "
        "see the console below, or raise the timeout (slow host, software emulation)",
        phase=phase,
        console_tail=tail_file(console, 40),
    )

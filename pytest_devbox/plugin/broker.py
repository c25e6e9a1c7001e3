"""Under pytest-xdist: the controller owns the shared guests, the workers borrow them.

The controller process starts each distro's shared guest on the first worker's request
(its Pool, as without xdist) and answers with what a worker needs to log in: the domain
name, the forwarded SSH port, the image the host key is pinned under. A worker attaches
a `Machine` of its own (its own SSH and libvirt connections) and only detaches it: the
guest's lifetime follows the controller, so a crashed worker leaks nothing, and the
controller's libvirt connection (autodestroy) takes every guest with it, even on kill -9.

One JSON line each way over a Unix socket in a private directory of the controller. A
distro that failed to start is remembered: the other workers fail fast with its error
instead of booting it again. On Ctrl-C a guest still starting for a worker goes with the
controller's process, as every guest does (libvirt destroys it with our connection).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import socketserver
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..errors import DevboxError

if TYPE_CHECKING:
    from ..config.profiles import Profile
    from ..config.settings import Settings
    from ..guest.machine import Machine

# The key of the socket path in xdist's workerinput.
WORKER_INPUT_KEY = "devbox_broker"
# The key of a worker's per-distro stats in xdist's workeroutput.
WORKER_OUTPUT_KEY = "devbox_stats"
Info = dict[str, Any]


class Broker:
    """Serves `start(distro) -> Info` to workers; see the module docstring."""

    def __init__(self, start: Callable[[str], Info]) -> None:
        self._start = start
        self._failed: dict[str, str] = {}
        self._dir = Path(tempfile.mkdtemp(prefix="devbox-broker-"))  # 0700: ours alone
        self.path = self._dir / "sock"
        broker = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                try:
                    distro = str(json.loads(self.rfile.readline())["distro"])
                    reply = broker.answer(distro)
                except (ValueError, KeyError, TypeError) as e:
                    reply = {"error": f"bad request: {e}"}
                self.wfile.write(json.dumps(reply).encode() + b"\n")

        self._server = socketserver.ThreadingUnixStreamServer(str(self.path), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="devbox-broker", daemon=True
        )
        self._thread.start()

    def answer(self, distro: str) -> Info:
        """{"guest": info} or {"error": why}; a failure is given to every later asker."""
        if distro in self._failed:
            return {"error": self._failed[distro]}
        try:
            return {"guest": self._start(distro)}
        except DevboxError as e:
            self._failed.setdefault(distro, str(e))
            return {"error": self._failed[distro]}

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        shutil.rmtree(self._dir, ignore_errors=True)


def ask(path: str, distro: str) -> Info:
    """The controller's shared guest of `distro` (started now if need be), as `Info`.

    Waits as long as the controller takes (an image build can take many minutes); a
    controller that went away closes the socket, which ends the wait."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(path)
            s.sendall(json.dumps({"distro": distro}).encode() + b"\n")
            line = s.makefile("rb").readline()
    except OSError as e:
        raise DevboxError(f"cannot reach the pytest-xdist controller at {path}: {e}") from e
    if not line:
        raise DevboxError("the pytest-xdist controller closed the connection without an answer")
    reply: Info = json.loads(line)
    if "error" in reply:
        raise DevboxError(str(reply["error"]))
    guest: Info = reply["guest"]
    return guest


def describe(machine: Machine, uri: str) -> Info:
    """What a worker needs to attach to `machine`, which runs at libvirt `uri`
    (controller side): where it is (attach.Running), and its image and boot time."""
    from ..guest.attach import Running

    argv = machine.ssh_argv()
    where = Running(
        name=machine.name,
        uri=uri,
        port=int(argv[argv.index("-p") + 1]),
        overlay=str(machine.overlay),
        console_log=str(machine.console_log),
        share=machine.share,
    )
    return {
        **where.as_dict(),
        "image": str(machine.image.path),
        "key": machine.image.key,
        "metadata": machine.image.metadata,
        "boot_seconds": machine.boot_seconds,
        "pid": os.getpid(),
    }


def attach(profile: Profile, info: Info, settings: Settings) -> Machine:
    """A Machine of this worker on the controller's guest described by `info` (on its
    host: this one or a remote one): close it with `detach()`, which leaves the guest
    to the controller."""
    from ..guest import attach as attaching
    from ..image.cache import ImageInfo

    image = ImageInfo(Path(info["image"]), str(info["key"]), False, None, info["metadata"])
    return attaching.attach(
        attaching.Running.from_dict(info),
        profile,
        image,
        settings,
        whose="the controller's guest",
        boot_seconds=float(info["boot_seconds"]),
    )

"""Under pytest-xdist: the controller owns the shared guests, the workers borrow them.

The controller process starts each distro's shared guest on the first worker's request
(its Pool, as without xdist) and answers with what a worker needs to log in: the domain
name, the forwarded SSH port, the image the host key is pinned under. A worker attaches
a `Machine` of its own (its own SSH and libvirt connections) and only detaches it: the
guest's lifetime follows the controller, so a crashed worker leaks nothing, and the
controller's libvirt connection (autodestroy) takes every guest with it, even on kill -9.

One JSON line each way over a Unix socket in a private directory of the controller. A
distro that failed to start (any exception) is remembered: the other workers fail fast
with its error instead of booting it again. A worker done with a distro says so; when
every worker that asked for it is done, the controller stops its guest, making room in
memory for the next distros (a worker that gets more of its tests later asks again).
On Ctrl-C a guest still starting for a worker goes with the controller's process, as
every guest does (libvirt destroys it with our connection).
"""

from __future__ import annotations

import contextlib
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
    """Serves `start(distro) -> Info` to workers; see the module docstring. A worker that
    is done with a distro says so: once no worker that asked for it still needs it,
    `release(distro)` lets its shared guest go (memory for the next distros)."""

    def __init__(
        self, start: Callable[[str], Info], release: Callable[[str], None] = lambda _: None
    ) -> None:
        self._start = start
        self._release = release
        self._failed: dict[str, str] = {}
        self._users: dict[str, set[str]] = {}  # distro -> workers using its guest now
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self._closed = False
        self._dir = Path(tempfile.mkdtemp(prefix="devbox-broker-"))  # 0700: ours alone
        self.path = self._dir / "sock"
        broker = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                try:
                    request = json.loads(self.rfile.readline())
                    distro, worker = str(request["distro"]), str(request.get("worker", ""))
                    if request.get("done"):
                        reply = broker.done(distro, worker)
                    else:
                        reply = broker.answer(distro, worker)
                except (ValueError, KeyError, TypeError, AttributeError) as e:
                    reply = {"error": f"bad request: {e}"}
                with contextlib.suppress(OSError):  # the worker went away: nobody to tell
                    self.wfile.write(json.dumps(reply).encode() + b"\n")

        self._server = socketserver.ThreadingUnixStreamServer(str(self.path), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="devbox-broker", daemon=True
        )
        self._thread.start()

    def _lock(self, distro: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(distro, threading.Lock())

    def answer(self, distro: str, worker: str = "") -> Info:
        """{"guest": info} or {"error": why}; a failure is given to every later asker."""
        with self._lock(distro):
            if self._closed:
                return {"error": "the pytest-xdist controller is ending its session"}
            if distro in self._failed:
                return {"error": self._failed[distro]}
            try:
                info = self._start(distro)
            except Exception as e:  # any failure is this distro's, remembered and told
                why = str(e) if isinstance(e, DevboxError) else unexpected(distro, e)
                self._failed.setdefault(distro, why)
                return {"error": self._failed[distro]}
            self._users.setdefault(distro, set()).add(worker)
            return {"guest": info}

    def done(self, distro: str, worker: str) -> Info:
        """`worker` needs `distro`'s guest no more: the last one out releases it."""
        with self._lock(distro):
            users = self._users.get(distro)
            if users is None or worker not in users:
                return {"done": False}
            users.discard(worker)
            if users or self._closed:
                return {"done": False}
            del self._users[distro]
            try:
                self._release(distro)
            except Exception as e:  # told to the worker, not lost in a handler thread
                return {"error": unexpected(distro, e)}
            return {"done": True}

    def close(self) -> None:
        """Stop serving: asks from now on get an error instead of starting a guest (one
        still starting is stopped by the pool it lands in, which is closed: pool.py)."""
        self._closed = True
        self._server.shutdown()
        self._server.server_close()
        shutil.rmtree(self._dir, ignore_errors=True)


def unexpected(distro: str, e: Exception) -> str:
    """What a worker is told of a failure that is not a DevboxError."""
    return (
        f"{distro}: the pytest-xdist controller failed to start its shared guest: "
        f"{type(e).__name__}: {e} (run without -n to see where)"
    )


def ask(path: str, distro: str, worker: str = "") -> Info:
    """The controller's shared guest of `distro` (started now if need be), as `Info`.

    Waits as long as the controller takes (an image build can take many minutes, a
    guest's memory admission at most its boot deadline); a controller that went away
    closes the socket, which ends the wait."""
    reply = _request(path, {"distro": distro, "worker": worker})
    if "error" in reply:
        raise DevboxError(str(reply["error"]))
    guest: Info = reply["guest"]
    return guest


def tell_done(path: str, distro: str, worker: str) -> None:
    """Tell the controller this worker is done with `distro`'s shared guest."""
    reply = _request(path, {"distro": distro, "worker": worker, "done": True})
    if "error" in reply:
        raise DevboxError(str(reply["error"]))


def _request(path: str, request: Info) -> Info:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(path)
            s.sendall(json.dumps(request).encode() + b"\n")
            line = s.makefile("rb").readline()
    except OSError as e:
        raise DevboxError(f"cannot reach the pytest-xdist controller at {path}: {e}") from e
    if not line:
        raise DevboxError("the pytest-xdist controller closed the connection without an answer")
    reply: Info = json.loads(line)
    return reply


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

"""How many SSH channels one connection keeps open at once, and waiting out refusals.

OpenSSH's sshd serves at most ``MaxSessions`` sessions per connection (10 by default)
and refuses the next channel open. A connection shared by many threads therefore keeps
its channels in flight below that, and a thread whose open is refused anyway (a slow
guest's sshd frees a session a while after its channel closed) waits for one of the
connection's channels to close, or a short backoff, and tries again.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

__all__ = ["MAX_CHANNELS", "ChannelSlots"]

MAX_CHANNELS = 8
"""Channels in flight per connection by default: below OpenSSH's ``MaxSessions 10``."""


class ChannelSlots:
    """``limit`` slots for channels, and a count of closes a refused open can wait on."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"max_channels must be at least 1, not {limit}")
        self.limit = limit
        self.refused = 0
        """How many channel opens the server refused (each was retried)."""
        self._free = threading.BoundedSemaphore(limit)
        self._closes = 0
        self._closed = threading.Condition()

    @property
    def closes(self) -> int:
        """How many channels have closed so far: pass it to :meth:`wait_after_refusal`."""
        return self._closes

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Hold a slot while the block runs (waiting for one), then wake refused openers."""
        with self._free:
            try:
                yield
            finally:
                with self._closed:
                    self._closes += 1
                    self._closed.notify_all()

    def wait_after_refusal(self, seen: int, timeout: float) -> None:
        """Count a refusal; wait until a channel closes after ``seen`` closes, or ``timeout``."""
        with self._closed:
            self.refused += 1
            self._closed.wait_for(lambda: self._closes != seen, timeout)

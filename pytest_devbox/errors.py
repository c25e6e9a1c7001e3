"""One error family: every message says what went wrong and what to do next."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .result import shorten

if TYPE_CHECKING:
    from .result import Result


class DevboxError(Exception):
    """Base of every error pytest-devbox raises on purpose."""


class HostNotReady(DevboxError):
    """The host lacks something required (libvirt, a tool, a kernel, permissions)."""


class UnknownDistro(DevboxError):
    """A distro name that no built-in or user profile defines."""


class ProfileError(DevboxError):
    """A malformed user profile (unknown field, wrong type, bad share kind, ...)."""


class TemplateBuildError(DevboxError):
    """Building a local virt-builder template failed."""


class ImageBuildError(DevboxError):
    """virt-builder could not build a cached image."""


class CacheLockTimeout(DevboxError):
    """Another process held the image cache lock for too long."""


class DomainError(DevboxError):
    """libvirt refused to create, inspect or destroy a domain."""


class RestoreUnavailable(DevboxError):
    """A guest cannot be restored from a save (profile, host or save): boot it instead."""


class SyncError(DevboxError):
    """Copying the code dir into a guest's /code (share = "sync") failed."""


class BootTimeout(DevboxError):
    """A guest did not become ready before the deadline."""

    def __init__(self, message: str, *, phase: str, console_tail: str = "") -> None:
        self.phase = phase
        self.console_tail = console_tail
        if console_tail:
            message = f"{message}\n--- last lines of the serial console ---\n{console_tail}"
        super().__init__(message)


class GuestDied(BootTimeout):
    """The guest stopped (crash, panic, shutdown) while we were waiting for it."""


class SSHError(DevboxError):
    """The SSH connection to a guest failed or was refused."""


class HostKeyMismatch(SSHError):
    """The guest presented a host key other than the pinned one."""


class CommandError(DevboxError):
    """A command run in a guest did not succeed; ``result`` holds what it produced.

    Each subclass builds its own message: a one-line verdict naming the command, then
    the tail of each output stream.
    """

    def __init__(self, result: Result, verdict: str) -> None:
        self.result = result
        super().__init__(f"{verdict}\n{result.tails()}")


class CommandFailed(CommandError):
    """A command run in a guest exited non-zero (raised when check=True)."""

    def __init__(self, result: Result) -> None:
        shown = shorten(result.command, 500)
        if result.exit_status is None:
            verdict = (
                f"command `{shown}` ended without an exit status after {result.duration:.1f} s "
                "(killed by a signal, or the connection dropped)"
            )
        else:
            verdict = (
                f"command `{shown}` exited with status {result.exit_status} "
                f"after {result.duration:.1f} s"
            )
        super().__init__(result, verdict)


class CommandTimeout(CommandError):
    """A command run in a guest did not finish in time; it was stopped."""

    def __init__(self, result: Result, timeout: float) -> None:
        self.timeout = timeout
        super().__init__(
            result, f"command timed out after {timeout:g} s and was stopped: {result.command}"
        )
